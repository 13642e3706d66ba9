"""The team pipeline around qvggt: S3 artifacts (storage), credentials, the MLflow registry, Prefect tasks.

Imported only by tasks/, flows/ and tests: it needs the ``pipeline`` extra (boto3, mlflow, prefect), which the
core modules (model, quant, kernels, eval, calib) never import. Import the submodules directly; this package
imports nothing on its own so that ``import qvggt.pipeline.credentials`` stays light.
"""
