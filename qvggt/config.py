"""The project's one config system: typed, validated sections loaded from ``params.yaml``.

Each top-level section of ``params.yaml`` maps to one pydantic model below (one section per pipeline stage, as
DVC stages read them). Unknown keys, wrong types and out-of-range values fail on load with the offending key
named. Later stages (calibration, quantization, evaluation, pipeline) add their sections here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    num_frames: int = Field(8, ge=1)
    height: int = Field(126, gt=0)
    width: int = Field(126, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        ranges = {"train_seeds": self.train_seeds, "calib_seeds": self.calib_seeds, "eval_seeds": self.eval_seeds}
        names = list(ranges)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if ranges[a].overlaps(ranges[b]):
                    raise ValueError(f"data.{a} and data.{b} overlap: splits must be disjoint")
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

    @model_validator(mode="after")
    def _check(self) -> PredictConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"predict.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        return self


class ProjectConfig(Section):
    """All of ``params.yaml``."""

    data: DataConfig = DataConfig()
    predict: PredictConfig = PredictConfig()


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
