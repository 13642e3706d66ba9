"""The project's one config system: typed, validated sections loaded from ``params.yaml``.

Each top-level section of ``params.yaml`` maps to one pydantic model below (one section per pipeline stage, as
DVC stages read them). Unknown keys, wrong types and out-of-range values fail on load with the offending key
named. Later stages (calibration, quantization, evaluation, pipeline) add their sections here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qvggt.data.synthetic import CATEGORIES
from qvggt.model.config import PRESETS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeedRange(Section):
    """Half-open range [start, stop) of synthetic scene seeds."""

    start: int = Field(ge=0)
    stop: int

    @model_validator(mode="after")
    def _check(self) -> SeedRange:
        if self.stop <= self.start:
            raise ValueError(f"empty seed range [{self.start}, {self.stop})")
        return self

    def seeds(self) -> range:
        return range(self.start, self.stop)

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop


class DataConfig(Section):
    """Synthetic data splits. Defined once here so calibration and evaluation are disjoint by construction."""

    train_seeds: SeedRange = SeedRange(start=0, stop=100_000)
    calib_seeds: SeedRange = SeedRange(start=100_000, stop=110_000)
    eval_seeds: SeedRange = SeedRange(start=200_000, stop=210_000)
    # Training's held-out validation (and its gate): its own scenes, so a run is never tuned on the benchmark's.
    val_seeds: SeedRange = SeedRange(start=210_000, stop=211_000)
    num_frames: int = Field(8, ge=1)
    height: int = Field(126, gt=0)
    width: int = Field(126, gt=0)
    # Categories never seen in training or calibration: evaluation reports them as held out.
    heldout_categories: tuple[str, ...] = ("centerpiece", "flythrough")

    def train_categories(self) -> tuple[str, ...]:
        return tuple(c for c in CATEGORIES if c not in self.heldout_categories)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        ranges = {
            "train_seeds": self.train_seeds, "calib_seeds": self.calib_seeds, "eval_seeds": self.eval_seeds,
            "val_seeds": self.val_seeds,
        }  # fmt: skip
        names = list(ranges)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if ranges[a].overlaps(ranges[b]):
                    raise ValueError(f"data.{a} and data.{b} overlap: splits must be disjoint")
        unknown = [c for c in self.heldout_categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"data.heldout_categories {unknown} are not among {list(CATEGORIES)}")
        if len(self.heldout_categories) >= len(CATEGORIES):
            raise ValueError("data.heldout_categories leaves no category to train or calibrate on")
        for name in ("height", "width"):
            if getattr(self, name) % 14:
                raise ValueError(f"data.{name}={getattr(self, name)} must be a multiple of 14")
        return self


class PredictConfig(Section):
    """Defaults of ``qvggt predict``."""

    preset: str = "tiny"
    checkpoint: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    conf_percentile: float = Field(50.0, ge=0, le=100)
    seed: int = 0
    # The cloud to write and draw: depth unprojected with the predicted cameras, or the point head's map.
    points: Literal["depth", "pointmap"] = "depth"

    @model_validator(mode="after")
    def _check(self) -> PredictConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"predict.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        return self


class TrainConfig(Section):
    """``qvggt train``: training a preset on cached synthetic scenes (stage ``train_small``)."""

    preset: str = "small"
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(2, ge=1)
    num_frames: int = Field(4, ge=1)
    image_size: int = Field(126, gt=0)
    num_scenes: int = Field(2000, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    # A warm restart (trainer.lr_factor): the first cosine ends at ``restart_step`` (at min_lr_ratio), the learning
    # rate jumps to ``restart_lr_ratio`` x lr there and decays by a second cosine to min_lr_ratio at ``steps``; Adam's
    # moments and the data order carry on. None: one cosine over the run. docs/TRAINING_NOTES.md section 11.
    restart_step: int | None = Field(None, ge=1)
    restart_lr_ratio: float = Field(1 / 3, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    camera_weight: float = Field(5.0, ge=0)
    depth_weight: float = Field(1.0, ge=0)
    point_weight: float = Field(1.0, ge=0)
    # Baseline control (docs/TRAINING_NOTES.md): render ``render_frames`` per scene and train on ``num_frames`` of
    # them, ``frame_stride`` apart, at a random start; the stride grows linearly to ``frame_stride_end`` over the
    # run (a narrow-to-wide curriculum). None: every rendered frame, as before.
    render_frames: int | None = Field(None, ge=1)
    frame_stride: int = Field(1, ge=1)
    frame_stride_end: int | None = Field(None, ge=1)
    # Learning-rate multiplier of the camera head and the aggregator's camera token.
    camera_lr_mult: float = Field(1.0, gt=0)
    # Steps at the start trained on the camera loss alone (aggregator + camera head; dense heads skipped).
    camera_only_steps: int = Field(0, ge=0)
    # Std of the camera and register tokens at initialisation (None: the model's own, VGGT's 1e-6). Their first-frame
    # slot is all that tells the reference frame apart; from scratch, 1e-6 leaves it indistinguishable for hundreds
    # of steps (docs/TRAINING_NOTES.md, section 5).
    token_init_std: float | None = Field(None, gt=0)
    # Correspondence tokens (qvggt/model/correspondence.py; docs/TRAINING_NOTES.md section 8): the model gets a patch
    # matcher, trained with InfoNCE on ground-truth matches (weight ``matcher_weight``), whose matches into frame 0
    # enter the patch tokens. The first ``matcher_steps`` steps train the matcher alone (its matches are noise until
    # then); ``camera_only_steps`` counts from step 0 as well.
    correspondence_tokens: bool = False
    matcher_steps: int = Field(0, ge=0)
    matcher_weight: float = Field(1.0, ge=0)
    threads: int | None = Field(None, ge=1)
    mlflow_tracking_uri: str | None = None
    # Held-out validation (qvggt/train/validation.py) every ``val_every`` steps (0: off) on ``val_scenes`` scenes of
    # data.eval_seeds; from ``gate_step`` on, each validation must find the median rotation error at least
    # ``gate_min_gain`` below identity poses' (and, if set, the held-out yaw correlation at least ``gate_min_yaw_corr``,
    # which a model that ignores the other views cannot reach) or the run stops (resumable). None of these change
    # what is trained.
    val_every: int = Field(0, ge=0)
    val_scenes: int = Field(32, ge=1)
    gate_step: int | None = Field(None, ge=1)
    gate_min_gain: float = Field(0.15, ge=0, lt=1)
    gate_min_yaw_corr: float | None = Field(None, gt=-1, le=1)

    #: Fields that do not change the trained weights: a run may resume with other values of them.
    NOT_TRAINING: ClassVar[frozenset[str]] = frozenset(
        {"val_every", "val_scenes", "gate_step", "gate_min_gain", "gate_min_yaw_corr", "log_every",
         "checkpoint_every", "mlflow_tracking_uri"}
    )  # fmt: skip

    def training_signature(self) -> str:
        """JSON of the fields that determine the trained weights (what a resumed run must share). Without a restart
        the restart fields are left out, so runs started before they existed still resume."""
        unused = {"restart_step", "restart_lr_ratio"} if self.restart_step is None else set()
        return self.model_dump_json(exclude=set(self.NOT_TRAINING) | unused)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"train.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.image_size % 14:
            raise ValueError(f"train.image_size={self.image_size} must be a multiple of 14")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")
        if self.restart_step is not None and not self.warmup_steps < self.restart_step < self.steps:
            raise ValueError(
                f"train.restart_step ({self.restart_step}) must lie after train.warmup_steps ({self.warmup_steps}) and "
                f"before train.steps ({self.steps}), or be null for a single cosine"
            )
        if self.render_frames is not None:
            widest = max(self.frame_stride, self.frame_stride_end or 0)
            if (self.num_frames - 1) * widest >= self.render_frames:
                raise ValueError(
                    f"train.num_frames={self.num_frames} frames {widest} apart need train.render_frames > "
                    f"{(self.num_frames - 1) * widest}, got {self.render_frames}"
                )
        elif self.frame_stride != 1 or self.frame_stride_end is not None:
            raise ValueError("train.frame_stride / frame_stride_end need train.render_frames")
        if (self.matcher_steps or self.matcher_weight != 1.0) and not self.correspondence_tokens:
            raise ValueError("train.matcher_steps / matcher_weight train the matcher: set train.correspondence_tokens")
        if self.correspondence_tokens and self.num_frames < 2:
            raise ValueError("train.correspondence_tokens matches frames to frame 0: it needs train.num_frames >= 2")
        if self.matcher_steps >= self.steps:
            raise ValueError(f"train.matcher_steps ({self.matcher_steps}) must be below train.steps ({self.steps})")
        if self.val_every and self.num_frames < 2:
            raise ValueError("train.val_every scores relative poses: it needs train.num_frames >= 2")
        if self.gate_step is not None and not self.val_every:
            raise ValueError("train.gate_step is judged by validations: set train.val_every too")
        return self


def job_name(job: Mapping[str, Any]) -> str:
    """A pipeline job's name (folder, MLflow run, model key in reports): its ``label`` or ``method-wWaA``."""
    if job.get("label"):
        return str(job["label"])
    return f"{job['method']}-w{job['wbits']}a{job['abits'] if job['abits'] is not None else 16}"


class QuantJob(Section):
    """One quantized configuration the pipeline produces.

    ``options`` are the method's extra config fields (e.g. ``{reconstruct: false}`` or ``{gptq: true}`` for
    quantvggt), checked against the method on load; ``label`` names a job when two share method and bits."""

    method: str = "rtn"
    wbits: int = Field(8, ge=2, le=8)
    abits: int | None = Field(8, ge=2, le=8)
    options: dict[str, Any] = {}
    label: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")

    @model_validator(mode="after")
    def _method_accepts(self) -> QuantJob:
        from qvggt.quant.command import make_config  # lazy: qvggt.quant imports this module

        make_config(self.method, self.wbits, self.abits, None, "default", False, self.options)
        return self

    @property
    def name(self) -> str:
        return job_name(self.model_dump())


class PipelineConfig(Section):
    """The quantize -> evaluate -> benchmark -> track flow (``flows/quantize_vggt.py``)."""

    base_weights: str = "models/small/model.safetensors"
    # Factories, not instances: a QuantJob checks its options against qvggt.quant, which imports this module.
    jobs: list[QuantJob] = Field(
        default_factory=lambda: [
            QuantJob(method="quantvggt", wbits=8, abits=8),
            QuantJob(method="quantvggt", wbits=4, abits=4),
            QuantJob(method="rtn", wbits=4, abits=4),
        ]
    )
    # No calib_scenes: the flow always quantizes on the `calibrate` section's NFDS set (its size is
    # n_clusters * n_per_cluster); a key that changed nothing was refused rather than kept.
    eval_scenes: int = Field(8, gt=0)
    eval_frames: int = Field(4, ge=2)
    # Where quantize and evaluate run: "auto" = the worker's GPU when it has one (jobs then run one at a time: one
    # model copy on the GPU), else its CPU (jobs concurrently). "cuda" without a GPU fails before any work.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "runs/pipeline"
    mlflow_tracking_uri: str = "sqlite:///runs/pipeline/mlflow.db"

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        names = [j.name for j in self.jobs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"pipeline.jobs must be a non-empty list of distinct configs, got {names}")
        return self

    def find_job(self, key: str) -> QuantJob:
        """The job named ``key`` (its label, or ``method-wWaA`` when unlabelled); a labelled job is also found by
        its ``method-wWaA`` when no other job shares that method and bits (DVC's stages, which cannot read an
        optional label, name jobs that way). Raises ValueError naming the valid keys."""
        for job in self.jobs:
            if job.name == key:
                return job
        # DVC renders a weight-only job's abits (None) as "None"; job_name spells it a16.
        by_format = [
            j for j in self.jobs
            if key in (job_name({**j.model_dump(), "label": None}), f"{j.method}-w{j.wbits}a{j.abits}")
        ]  # fmt: skip
        if len(by_format) == 1:
            return by_format[0]
        if by_format:
            raise ValueError(
                f"pipeline.jobs {[j.name for j in by_format]} share {key}: only their labels tell them apart, "
                "which the Prefect flow uses but DVC's quantize stages cannot; run them with the flow or give them "
                "different bits"
            )
        raise ValueError(f"no pipeline job {key!r} in pipeline.jobs; jobs: {[j.name for j in self.jobs]}")


class CalibrateConfig(Section):
    """``qvggt calibrate`` (DVC stage ``calibrate``): which calibration samples the calibrated methods see."""

    checkpoint: str = "models/small/model.safetensors"
    mode: Literal["random", "filter", "cluster", "nfds"] = "nfds"
    pool_scenes: int = Field(24, ge=1)  # candidate pool: the first scenes of data.calib_seeds
    frames: int = Field(4, ge=1)
    n_clusters: int = Field(4, ge=1)
    n_per_cluster: int = Field(2, ge=1)
    n_init: int = Field(10, ge=1)
    iqr_factor: float = Field(1.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> CalibrateConfig:
        if self.mode in ("cluster", "nfds") and self.pool_scenes < self.n_clusters:
            raise ValueError(
                f"pool_scenes={self.pool_scenes} is smaller than n_clusters={self.n_clusters}: "
                "raise pool_scenes or lower n_clusters"
            )
        return self


class ProjectConfig(Section):
    """All of ``params.yaml``."""

    data: DataConfig = DataConfig()
    predict: PredictConfig = PredictConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="after")
    def _fits_the_splits(self) -> ProjectConfig:
        # Scene counts drawn from a split must fit in it: found here, at load, not after an hour of calibration.
        for field_name, count, split in (
            ("calibrate.pool_scenes", self.calibrate.pool_scenes, "calib_seeds"),
            ("pipeline.eval_scenes", self.pipeline.eval_scenes, "eval_seeds"),
        ):
            seeds = getattr(self.data, split)
            size = seeds.stop - seeds.start
            if count > size:
                raise ValueError(
                    f"{field_name}={count} is more than the {size} scenes of data.{split}: lower it or widen the split"
                )
        return self


class ConfigError(ValueError):
    """params.yaml is missing, malformed, or has invalid values."""


def load_config(path: str | Path = "params.yaml") -> ProjectConfig:
    """Load and validate ``params.yaml``; a missing file gives the defaults only when ``path`` is the default."""
    path = Path(path)
    if not path.is_file():
        if str(path) == "params.yaml":
            return ProjectConfig()
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid {path}: {problems}") from exc
