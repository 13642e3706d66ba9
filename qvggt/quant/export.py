"""Packed quantized checkpoints: ``save_quantized`` / ``load_quantized``.

A quantized model is stored as one safetensors file holding exactly its state_dict (int8 codes, int4 codes
packed two per byte, fp8 codes, float32 scales and zero points, float biases, and the float weights of every
layer left in full precision, with any smoothing already folded into them), plus a JSON manifest, also embedded
in the file's metadata:

    format/version, quantization config (``QuantConfig.to_dict``), base architecture (``VGGTConfig``),
    base weights sha256, calibration sample ids and manifest hash, package version, weight-byte summary,
    each quantized layer's original float dtype (``orig_dtype``: the summary's "before" bytes; manifests written
    before it existed get it from the layer's stored float bias, or the checkpoint's float tensors), and the
    method's report (``quant_report``: quantvggt's reconstruction steps per block, ``model.qvggt_quant_report``).

Loading rebuilds the architecture on the meta device, swaps in the quantized modules the config names (the
structure does not depend on calibration: folded transforms only change values), and assigns the stored tensors,
so a quantized vggt-1b never materialises its float weights.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qvggt
from qvggt.io import atomic_path
from qvggt.model import VGGT, VGGTConfig, build_model
from qvggt.quant.api import quantization_summary, quantize_
from qvggt.quant.config import QuantConfig, RTNConfig, config_from_dict
from qvggt.quant.formats import parse_format
from qvggt.quant.linear import QuantConv2d, QuantLinear
from qvggt.quant.special_tokens import install_token_period_hook

FORMAT = "qvggt-quantized"
FORMAT_VERSION = 1
MANIFEST_KEY = "qvggt_manifest"


def save_quantized(
    model: VGGT,
    config: QuantConfig,
    path: str | Path,
    base_sha256: str | None = None,
    calibration_ids: Sequence[str] = (),
    calibration_manifest_sha256: str | None = None,
) -> Path:
    """Write ``model`` (already quantized with ``config``) to ``path`` (.safetensors) and ``path.with_suffix('.json')``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save quantized models to a .safetensors path, got {path}")
    summary = quantization_summary(model)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": type(config).__name__,
        "quant_config": config.to_dict(),
        "model_config": model.cfg.to_dict(),
        "base_sha256": base_sha256,
        "calibration": {"sample_ids": list(calibration_ids), "manifest_sha256": calibration_manifest_sha256},
        "qvggt_version": qvggt.__version__,
        # Online input rotations (QuantLinear.input_hadamard): module structure a config alone does not rebuild.
        "input_hadamard": {n: m.input_hadamard for n, m in model.named_modules() if getattr(m, "input_hadamard", 0)},
        # Special-token rows (QuantLinear.special_tokens): layer -> [special tokens per frame, the rows' format name].
        "special_rows": {
            n: [m.special_tokens, m.special_act_fmt.name]
            for n, m in model.named_modules()
            if getattr(m, "special_tokens", 0) and getattr(m, "special_act_fmt", None) is not None
        },
        "summary": {**asdict(summary), "compression": summary.compression},
        # Loading rebuilds layers in float32: their original dtype (byte accounting, bias dtype) comes from here.
        "orig_dtype": {n: _dtype_name(m.orig_dtype) for n, m in model.named_modules() if isinstance(m, _QUANT)},
        "quant_report": getattr(model, "qvggt_quant_report", None) or {},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: text})
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(text)
    return path


_QUANT = (QuantLinear, QuantConv2d)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: {name!r} is not a float dtype")
    return dtype


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # truncated or not safetensors
        raise ValueError(f"could not read {path}: {exc}") from exc


def has_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file carrying a qvggt manifest (whatever its content): False for a float
    checkpoint, a ``.pt`` file or a file that is not safetensors at all; ``read_manifest`` then validates it."""
    try:
        return MANIFEST_KEY in _metadata(Path(path))
    except ValueError:
        return False


def read_manifest(path: str | Path) -> dict:
    """The manifest embedded in a quantized checkpoint; ValueError if the file is not one, or its manifest is not
    valid JSON or of a format version this qvggt does not read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    meta = _metadata(path)
    if MANIFEST_KEY not in meta:
        raise ValueError(f"{path} is not a qvggt quantized checkpoint (no manifest): use qvggt.model.load_vggt")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its qvggt manifest is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: its qvggt manifest is not a JSON object")  # noqa: TRY004
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format {manifest.get('format')} v{manifest.get('version')} (this qvggt reads "
            f"{FORMAT} v{FORMAT_VERSION}; was it written by a newer version?)"
        )
    return manifest


def _orig_dtypes(
    manifest: Mapping, state: Mapping[str, torch.Tensor], names: Sequence[str], path: Path
) -> dict[str, torch.dtype]:
    """Each quantized layer's original float dtype: the manifest's, or for manifests written before it was
    recorded, the dtype of the layer's float bias (kept in the original dtype), else the most common float dtype
    of the checkpoint's unquantized tensors (a float model is one dtype)."""
    stored = manifest.get("orig_dtype")
    if stored is not None:
        return {n: _parse_dtype(stored[n], f"{path}: orig_dtype of {n}") for n in names if n in stored}
    scale_names = ("weight_q", "weight_scale", "weight_zero_point")  # codes (fp8 too) and scales: not the model's
    floats = Counter(t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith(scale_names))
    common = floats.most_common(1)[0][0] if floats else torch.float32
    out = {}
    for n in names:
        bias = state.get(f"{n}.bias")
        out[n] = bias.dtype if bias is not None and bias.is_floating_point() else common
    return out


def structure_config(config: QuantConfig) -> RTNConfig:
    """An RTN config with the same formats, coverage and overrides: it yields the same module structure."""
    return RTNConfig(
        weight=config.weight,
        activation=config.activation,
        coverage=config.coverage,
        layer_overrides=dict(config.layer_overrides),
    )


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> VGGT:
    """Rebuild a quantized model from ``save_quantized``'s file; it runs the torch reference path on any device."""
    manifest = read_manifest(path)
    cfg = VGGTConfig.from_dict(manifest["model_config"])
    config = config_from_dict(manifest["quant_config"])
    model = build_model(cfg, "meta")
    quantize_(model, structure_config(config))
    state = load_file(str(path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match its manifest: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, assign=True)
    modules = dict(model.named_modules())
    quantized = [n for n, m in modules.items() if isinstance(m, _QUANT)]
    for name, dtype in _orig_dtypes(manifest, state, quantized, Path(path)).items():
        modules[name].orig_dtype = dtype
    for name, block in (manifest.get("input_hadamard") or {}).items():
        if name not in modules or not hasattr(modules[name], "input_hadamard"):
            raise ValueError(f"{path}: manifest rotates the input of {name!r}, which is not a quantized Linear")
        modules[name].input_hadamard = int(block)
    special = manifest.get("special_rows") or {}
    for name, (count, fmt) in special.items():
        if not isinstance(modules.get(name), QuantLinear):
            raise ValueError(f"{path}: manifest quantizes special-token rows of {name!r}, not a quantized Linear")  # noqa: TRY004
        modules[name].set_special_rows(int(count), parse_format(fmt))
    if special:
        install_token_period_hook(model)
    model.qvggt_manifest = manifest
    model.qvggt_quant_report = manifest.get("quant_report") or {}  # kept if the model is saved again
    return model.to(device).eval()
