"""``qvggt quantize``: quantize a VGGT checkpoint with a named method and write a packed checkpoint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvggt.io import sha256_file
from qvggt.model import load_vggt
from qvggt.quant.api import QuantSummary, needs_calibration, quantization_summary, quantize_
from qvggt.quant.config import Coverage, QuantConfig, RTNConfig, weight_activation_formats
from qvggt.quant.export import save_quantized

if TYPE_CHECKING:  # the params config needs pydantic, which the GPU machine lacks: imported where data is drawn
    from qvggt.config import DataConfig

METHODS = ("rtn", "smoothquant", "quarot", "gptq", "quantvggt")


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    summary: QuantSummary
    num_calibration_samples: int
    seconds: float = 0.0  # wall time of load + calibration + quantization + export
    peak_device_bytes: int | None = None  # torch.cuda.max_memory_allocated on a CUDA device, else None


def _config_class(method: str) -> type[QuantConfig]:
    if method == "rtn":
        return RTNConfig
    if method == "smoothquant":
        from qvggt.quant.smooth import SmoothQuantConfig

        return SmoothQuantConfig
    if method == "quarot":
        from qvggt.quant.quarot import QuaRotConfig

        return QuaRotConfig
    if method == "gptq":
        from qvggt.quant.gptq import GPTQConfig

        return GPTQConfig
    if method == "quantvggt":
        from qvggt.quant.dsfq import QuantVGGTConfig

        return QuantVGGTConfig
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def make_config(
    method: str,
    wbits: int,
    abits: int | None,
    group_size: int | None,
    coverage: str,
    fp8: bool,
    options: Mapping[str, Any] | None = None,
) -> QuantConfig:
    """The method's config for W{wbits}A{abits}; ValueError for unknown methods, impossible formats, or
    ``options`` (extra config fields, e.g. ``{"gptq": True}`` for quantvggt, ``{"act_order": True}`` for gptq)
    that the method does not have (the message lists the ones it has)."""
    cls = _config_class(method)
    weight, act = weight_activation_formats(wbits, abits, group_size=group_size, fp8=fp8)
    common: dict[str, Any] = {"weight": weight, "activation": act, "coverage": Coverage(coverage)}
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)} - {"version"}
    bad = sorted(set(options) - (fields - set(common)))
    if bad:
        raise ValueError(
            f"method {method!r} has no option(s) {bad}; its options: {sorted(fields - set(common))} "
            "(formats and coverage come from wbits/abits/group_size/fp8/coverage)"
        )
    return cls(**common, **options)


def reconstruction_options(reconstruct: bool | None, epochs: int | None, time_budget_s: float | None) -> dict[str, Any]:
    """quantvggt's reconstruction options from CLI flags (None: the config's default; a budget of 0: no limit);
    ``make_config`` refuses them for the other methods."""
    options: dict[str, Any] = {}
    if reconstruct is not None:
        options["reconstruct"] = reconstruct
    if epochs is not None:
        options["recon_epochs"] = epochs
    if time_budget_s is not None:
        options["recon_time_budget_s"] = time_budget_s or None
    return options


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's ``--option``) -> a dict; values are YAML scalars as in params.yaml
    (``8``, ``true``, ``null``, ``0.5``), so ``special_token_abits=null`` turns the special rows off. The keys are
    checked by ``make_config`` against the method's config fields."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option special_token_abits=null")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def calibration_batches(
    data: DataConfig, n: int, frames: int, hw: tuple[int, int]
) -> tuple[list[torch.Tensor], list[str]]:
    """``n`` seeded scenes of the calibration split (disjoint from evaluation by construction), one batch each."""
    from qvggt.eval.datasets import SyntheticEvalDataset

    ds = SyntheticEvalDataset.from_config(n, "calib", data=data, num_frames=frames, height=hw[0], width=hw[1])
    samples = list(ds)
    return [torch.from_numpy(s.images)[None] for s in samples], [s.sample_id for s in samples]


def manifest_calibration(
    path: str | Path,
    data: DataConfig,
    model_sha256: str | None = None,
    image_hw: Sequence[int] | None = None,
    allow_other_model: bool = False,
) -> tuple[list[torch.Tensor], list[str], str]:
    """The batches and sample ids a calibration manifest (``qvggt calibrate``'s ``manifest.json``) names, and the
    manifest's sha256 (its canonical form: what identifies the calibration set in the checkpoint's manifest).

    ``model_sha256`` / ``image_hw``: the checkpoint being quantized and its image size. The samples were selected
    on the features of the model the manifest records (``config.model_sha256``) and are rendered at its
    ``config.image_hw``, so a manifest made with another model is refused unless ``allow_other_model``.

    Raises:
        ValueError: not a calibration manifest, made with another model (sha256 or image size), or empty.
    """
    from qvggt.calib.command import manifest_batches  # the calibrate verb renders its own pool
    from qvggt.calib.manifest import CalibrationManifest

    try:
        manifest = CalibrationManifest.read(path)
        sha = manifest.sha256()
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a calibration manifest ({exc}); write one with qvggt calibrate") from exc
    if not allow_other_model:
        _check_manifest_model(path, manifest.config, model_sha256, image_hw)
    batches, ids = manifest_batches(path, data)
    if not batches:
        raise ValueError(f"calibration manifest {path} selects no sample; rerun qvggt calibrate")
    return batches, ids, sha


def _check_manifest_model(
    path: str | Path, config: Mapping[str, Any], model_sha256: str | None, image_hw: Sequence[int] | None
) -> None:
    """ValueError if the calibration manifest records another model (or image size) than the one quantized."""
    fix = (
        "recalibrate with this checkpoint (qvggt calibrate --model <it>), or use the manifest anyway "
        "(qvggt quantize --allow-other-model; allow_other_model=True in Python)"
    )
    recorded = config.get("model_sha256")
    if model_sha256 is not None and recorded is not None and recorded != model_sha256:
        raise ValueError(
            f"calibration manifest {path} was selected with model sha256 {recorded}, but the checkpoint being "
            f"quantized has sha256 {model_sha256}: {fix}"
        )
    hw = config.get("image_hw")
    if image_hw is not None and hw is not None and [int(v) for v in hw] != [int(v) for v in image_hw]:
        raise ValueError(
            f"calibration manifest {path} renders its samples at {hw[0]}x{hw[1]}, but the checkpoint being "
            f"quantized runs at {image_hw[0]}x{image_hw[1]}: {fix}"
        )


def run_quantize(
    method: str,
    wbits: int,
    abits: int | None,
    out: str | Path,
    checkpoint: str | Path,
    group_size: int | None = None,
    coverage: str = "default",
    fp8: bool = False,
    calib_scenes: int = 8,
    calib_frames: int = 4,
    data: DataConfig | None = None,
    calib_manifest: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    allow_other_model: bool = False,
) -> QuantizeResult:
    """Quantize ``checkpoint`` and write ``out/model.safetensors`` (+ manifest JSON).

    Calibration (methods that need it): the samples a ``qvggt calibrate`` manifest names when ``calib_manifest``
    is given (rendered again and checked against the manifest's image hashes; ``calib_scenes`` / ``calib_frames``
    are then unused), otherwise the first ``calib_scenes`` scenes of the calibration split with ``calib_frames``
    views each. The checkpoint's manifest records the sample ids and the calibration manifest's sha256. A data-free
    method (``rtn``) ignores ``calib_manifest`` and records no calibration, so one pipeline setting serves every
    method. ``options``: extra fields of the method's config (``make_config``), e.g. ``{"gptq": True}``.
    ``device``: where the model calibrates and quantizes ("cpu", "cuda", "cuda:1"); the checkpoint is written from
    the CPU either way, and on CUDA the result reports the peak allocated device memory. ``allow_other_model``:
    use a calibration manifest that records another model (sha256) or image size than ``checkpoint``'s.

    Raises:
        ValueError: unknown method or coverage, impossible formats, or a calibration manifest that is not one,
            was made with another model (unless ``allow_other_model``), names another dataset, or no longer
            renders the same images.
        FileNotFoundError: the checkpoint or the calibration manifest does not exist.
    """
    if coverage not in {c.value for c in Coverage}:
        raise ValueError(f"unknown coverage {coverage!r}; use default or full")
    config = make_config(method, wbits, abits, group_size, coverage, fp8, options)
    if calib_manifest is not None and not Path(calib_manifest).is_file():
        # Checked before the model loads: a typo must not cost a model load (or silently fall back to scenes).
        raise FileNotFoundError(f"calibration manifest not found: {calib_manifest} (write one with qvggt calibrate)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible to torch: use device='cpu'")
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = load_vggt(checkpoint, device=dev)
    base_sha = sha256_file(checkpoint)
    batches: list[torch.Tensor] = []
    ids: list[str] = []
    manifest_sha: str | None = None
    if needs_calibration(config):
        if data is None:
            from qvggt.config import DataConfig

            data = DataConfig()
        if calib_manifest is not None:
            batches, ids, manifest_sha = manifest_calibration(
                calib_manifest, data, base_sha, model.cfg.default_image_hw, allow_other_model
            )
        else:
            batches, ids = calibration_batches(data, calib_scenes, calib_frames, model.cfg.default_image_hw)
    quantize_(model, config, calibration_data=[b.to(dev) for b in batches] or None)
    path = save_quantized(
        model,
        config,
        Path(out) / "model.safetensors",
        base_sha256=base_sha,
        calibration_ids=ids,
        calibration_manifest_sha256=manifest_sha,
    )
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return QuantizeResult(path, quantization_summary(model), len(ids), time.perf_counter() - start, peak)
