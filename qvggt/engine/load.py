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
            says which), a quantized checkpoint whose manifest this qvggt cannot read (its own error: unsupported
            version, damaged JSON), or a quantized format the engine has no kernel for (``UnsupportedLayerError``).
    """
    from qvggt.model import load_vggt
    from qvggt.quant.export import has_manifest
    from qvggt.quant.export import load_quantized as load_reference

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (write one with `qvggt quantize`)")
    # Only a file without a qvggt manifest is a float checkpoint (or none: load_vggt says which). A manifest that
    # fails to read must raise its own error, not send a quantized file down the float path ("missing 1362 ...").
    model = load_reference(path) if has_manifest(path) else load_vggt(path)
    return build_engine(model, options)
