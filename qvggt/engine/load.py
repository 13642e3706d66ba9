"""``qvggt.load_quantized(path)``: a packed checkpoint straight into the engine.

The returned ``Engine`` runs the kernels' torch twins on CPU; ``.to("cuda")`` moves it to the GPU, where it runs the
Triton kernels and refuses any silent torch fallback (``qvggt.kernels.require_kernels``).
"""

from __future__ import annotations

from pathlib import Path

from qvggt.engine.build import Engine, EngineOptions, build_engine

__all__ = ["load_quantized"]


def load_quantized(path: str | Path, options: EngineOptions | None = None) -> Engine:
    """Load a quantized checkpoint written by ``qvggt quantize`` (or a float VGGT checkpoint: the bf16 fused path)
    as an ``Engine``.

    Raises:
        FileNotFoundError: no such file.
        ValueError / CheckpointError: a file that is neither a quantized nor a float VGGT checkpoint (the message
            says which), or a quantized format the engine has no kernel for (``UnsupportedLayerError``).
    """
    from qvggt.model import load_vggt
    from qvggt.quant.export import load_quantized as load_reference
    from qvggt.quant.export import read_manifest

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (write one with `qvggt quantize`)")
    try:
        read_manifest(path)
        quantized = True
    except ValueError:  # no qvggt manifest: a float checkpoint, or not a checkpoint (load_vggt says which)
        quantized = False
    model = load_reference(path) if quantized else load_vggt(path)
    return build_engine(model, options)
