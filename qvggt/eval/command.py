"""``qvggt eval``: build predictors and a dataset from command-line specs, evaluate, report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from qvggt.config import DataConfig
from qvggt.eval.datasets import EvalDataset, make_dataset
from qvggt.eval.runner import EvalResult, ModelPredictor, Predictor, TrivialBaseline, evaluate
from qvggt.model import VGGT, load_vggt

PRESET_PREFIX = "preset:"
UNTRAINED_PREFIX = "untrained:"


def load_model_spec(spec: str, seed: int = 0) -> tuple[str, VGGT]:
    """``preset:NAME`` -> randomly initialised (seeded) preset; ``untrained:PARAMS`` -> the initialisation
    ``qvggt train`` starts from with the ``train`` section of the params file PARAMS (its architecture options, such
    as correspondence tokens, included); otherwise a checkpoint path (float, or a packed quantized checkpoint from
    ``qvggt quantize``). Returns (name, model)."""
    if spec.startswith(PRESET_PREFIX):
        torch.manual_seed(seed)
        name = spec[len(PRESET_PREFIX) :]
        return f"{name}-untrained", load_vggt(preset=name)
    if spec.startswith(UNTRAINED_PREFIX):
        from qvggt.config import load_config
        from qvggt.train.trainer import init_model

        tcfg = load_config(spec[len(UNTRAINED_PREFIX) :] or "params.yaml").train
        return f"{tcfg.preset}-untrained", init_model(tcfg).eval()
    path = Path(spec)
    from qvggt.quant.export import MANIFEST_KEY, load_quantized

    model = load_quantized(path) if _has_metadata(path, MANIFEST_KEY) else load_vggt(path)
    return path.parent.name + "/" + path.stem if path.parent.name else path.stem, model


def _has_metadata(path: Path, key: str) -> bool:
    """Whether ``path`` is a safetensors file whose metadata holds ``key`` (a quantized checkpoint)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return key in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (SafetensorError and I/O errors alike: let load_vggt report them)
        return False


def calibration_sample_ids(spec: str) -> set[str]:
    """Sample ids a quantized checkpoint was calibrated on (from its embedded manifest); empty for float models.
    The evaluation refuses every sample of the same scenes (:func:`qvggt.eval.datasets.scene_key`), whatever frames
    either drew."""
    path = Path(spec)
    from qvggt.quant.export import MANIFEST_KEY, read_manifest

    if spec.startswith((PRESET_PREFIX, UNTRAINED_PREFIX)) or not _has_metadata(path, MANIFEST_KEY):
        return set()
    return set((read_manifest(path).get("calibration") or {}).get("sample_ids") or [])


def build_dataset(
    spec: str, model: VGGT, frames: int, scenes: int, data: DataConfig, options: dict | None = None
) -> EvalDataset:
    """Dataset from its spec, with frames and image size matched to the reference model; ``options`` go to the
    dataset's constructor (e.g. ``min_sequence_length`` for Co3D)."""
    h, w = model.cfg.default_image_hw
    if spec.split(":", 1)[0].lower() == "synthetic":
        return make_dataset(spec, n=scenes, data=data, num_frames=frames, height=h, width=w, **(options or {}))
    return make_dataset(spec, num_frames=frames, target_size=w, **(options or {}))


def run_eval(
    model: str,
    compare: Sequence[str],
    dataset: str,
    out: str | Path,
    frames: int = 8,
    scenes: int = 16,
    baseline: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    data: DataConfig | None = None,
    exclude_ids: Sequence[str] = (),
    progress: bool = True,
    dataset_options: dict | None = None,
) -> EvalResult:
    """Evaluate ``model`` (the reference) and every ``compare`` spec on the same samples; write the report."""
    from qvggt.eval.report import write_report  # matplotlib only when a report is written

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    predictors: list[Predictor] = []
    ref_model = None
    exclude = set(exclude_ids)
    for spec in (model, *compare):
        exclude |= calibration_sample_ids(spec)  # a quantized model is never scored on its calibration scenes
        name, m = load_model_spec(spec)
        if any(p.name == name for p in predictors):
            name = f"{name}#{len(predictors)}"
        ref_model = ref_model or m
        predictors.append(ModelPredictor(name, m.to(device), dtypes[dtype]))
    if baseline:
        predictors.append(TrivialBaseline())
    ds = build_dataset(dataset, ref_model, frames, scenes, data or DataConfig(), dataset_options)
    result = evaluate(ds, predictors, out, max_scenes=scenes, exclude_ids=sorted(exclude), progress=progress)
    write_report(Path(out), result)
    return result
