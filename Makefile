# qvggt: make setup | make demo | make test
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint clean gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an open `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,pipeline]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/qvggt predict synthetic:200005 --frames 4 --out runs/demo
	# The pipeline (params.yaml `pipeline`): quantize, evaluate, benchmark (skipped without a GPU), track in MLflow.
	PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 $(BIN)/python flows/quantize_vggt.py

test: setup
	$(BIN)/python -m pytest -q -n 2  # one worker per core of the CI machine (pytest-xdist)

lint: setup
	$(BIN)/ruff check qvggt tests flows tasks
	$(BIN)/ruff format --check qvggt tests flows tasks

# pydantic for the GPU image (Python 3.12, no pydantic, no registry): scripts/gpu_check.sh installs these for its
# retention step. Run before a lent GPU's first call, and pass carry [".whl"] to the device tool (.whl/ is ignored).
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0

clean:
	rm -rf $(VENV) runs .pytest_cache
