"""qvggt: real low-bit quantization of VGGT-class 3D reconstruction transformers.

Importing qvggt pulls in torch and numpy only: no orchestration (prefect, mlflow, dvc, boto3), no CUDA
initialisation, so the model, quantization and kernel modules run on a bare GPU machine.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy, so `import qvggt` does not import the engine
    if name == "load_quantized":
        from qvggt.engine.load import load_quantized

        return load_quantized
    raise AttributeError(f"module 'qvggt' has no attribute {name!r}")
