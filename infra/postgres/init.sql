-- Run once by the postgres image on an empty data volume: one database per service, owned by POSTGRES_USER.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
