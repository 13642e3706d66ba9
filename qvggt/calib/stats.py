"""Streaming statistics of the inputs of a model's layers, split into special and patch tokens.

Forward pre-hooks see every input of the selected layers (by default ``attn.qkv``, ``attn.proj``, ``mlp.fc1``
and ``mlp.fc2`` of every frame and global block of the aggregator: the 4 * 2 * depth linears a quantiser
touches) and fold it into fixed-size accumulators at once; no activation is kept, so memory does not grow
with the number of batches.

Shape legend: B batch, S frames, P tokens per frame (special + patches), C input channels of a layer,
K = ``LogBins.num_counts`` histogram slots. Token groups:

- ``special``: camera + register tokens, positions ``[0, patch_start_idx)`` of each frame's sequence;
- ``patch``: the image-patch tokens, positions ``[patch_start_idx, P)``;
- ``all``: every token; for split layers it is the exact merge of ``special`` and ``patch``.

Layout of the aggregator blocks' inputs: frame blocks see ``[B*S, P, C]``, global blocks ``[B, S*P, C]``
(each frame's P tokens consecutive), and attention internals such as ``q_norm`` see ``[B, heads, N, d]``; in
all of them tokens lie along dim -2, so a token's position in its frame is ``index_on_dim_-2 % P``. P is read
from a pre-hook on the aggregator (``patch_start_idx + (H // patch) * (W // patch)`` of the images it gets),
or given as a ``TokenLayout``. Layers outside the aggregator's blocks are recorded as ``all`` only.

Per layer and group the report holds, per input channel ``[C]``: absmax, mean, std (population, ddof=0),
skewness and EXCESS kurtosis (Fisher: m4 / m2^2 - 3, biased/population moments, as
``scipy.stats.kurtosis(x, fisher=True, bias=True)``; 0 for a Gaussian); a histogram ``[K]`` of |x| over all
channels on fixed log-spaced edges; and the per-token L2 norm's max, mean, std and histogram ``[K]``.

Moment merge: each hook call is processed in row chunks; a chunk's per-channel mean and central sums
M2, M3, M4 are computed two-pass in float64 from the chunk itself (exact up to rounding), then merged into
the running totals with the pairwise update of Chan et al. / Pebay (2008), which combines central moments
of two sets without ever forming raw power sums, so it does not suffer the cancellation of
``E[x^4] - 4 E[x^3] mu + ...`` when |mean| >> std. Histograms use fixed edges, so they merge by addition.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from qvggt.io import atomic_open
from qvggt.model.hooks import HookSet
from qvggt.quant.special_tokens import tokens_per_frame

__all__ = [
    "DEFAULT_LINEARS",
    "GROUPS",
    "ActivationStats",
    "GroupStats",
    "LayerStats",
    "LogBins",
    "Moments",
    "StatsReport",
    "TokenLayout",
    "collect_stats",
    "default_layer_names",
    "parse_layer_name",
]

FORMAT = "qvggt-activation-stats"
FORMAT_VERSION = 1
GROUPS = ("special", "patch", "all")
# Inputs of these linears of every aggregator block: what weight/activation quantisation sees.
DEFAULT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_BLOCK_RE = re.compile(r"(?:^|\.)(frame|global)_blocks\.(\d+)\.(.+)$")
_ARRAY_FIELDS = ("absmax", "mean", "std", "skewness", "kurtosis", "hist", "norm_hist")
# Rows x channels of one float64 working chunk (32 MiB): bounds a hook's transient memory too.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class LogBins:
    """Fixed log-spaced histogram edges for magnitudes: ``lo * 10**(i / per_decade)`` up to ``hi``.

    Counts have ``num_counts = num_bins + 2`` slots: ``[ |x| < lo, bin 1, ..., bin num_bins, |x| >= hi ]``;
    bin i covers ``[edges[i-1], edges[i])``. Zeros land in the first (underflow) slot.
    """

    lo: float = 1e-4
    hi: float = 1e6
    per_decade: int = 8

    def __post_init__(self) -> None:
        if not (0 < self.lo < self.hi) or self.per_decade < 1:
            raise ValueError(f"need 0 < lo < hi and per_decade >= 1, got {self}")

    @property
    def num_bins(self) -> int:
        return max(1, round(self.per_decade * math.log10(self.hi / self.lo)))

    @property
    def num_counts(self) -> int:
        return self.num_bins + 2

    def edges(self) -> np.ndarray:
        """``[num_bins + 1]`` float64 edges from ``lo`` to ``hi``."""
        return np.logspace(math.log10(self.lo), math.log10(self.hi), self.num_bins + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "per_decade": self.per_decade}


@dataclass(frozen=True)
class TokenLayout:
    """Where special tokens sit: positions ``[0, patch_start_idx)`` of every run of ``tokens_per_frame``."""

    patch_start_idx: int
    tokens_per_frame: int

    def __post_init__(self) -> None:
        if not 0 <= self.patch_start_idx <= self.tokens_per_frame or self.tokens_per_frame < 1:
            raise ValueError(f"need 0 <= patch_start_idx <= tokens_per_frame >= 1, got {self}")


def parse_layer_name(name: str) -> tuple[str, int | None, str]:
    """``"aggregator.global_blocks.3.mlp.fc1"`` -> ``("global", 3, "fc1")``; other names -> ``("other", None, last)``."""
    m = _BLOCK_RE.search(name)
    if m is None:
        return "other", None, name.rsplit(".", 1)[-1]
    return m.group(1), int(m.group(2)), m.group(3).rsplit(".", 1)[-1]


def _find_aggregator(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The module holding ``frame_blocks``/``global_blocks``/``patch_start_idx`` and its name prefix ("" or "x.").
    A VGGT's ``aggregator`` first: a correspondence matcher holds blocks of the same names."""

    def is_aggregator(mod: nn.Module | None) -> bool:
        return all(hasattr(mod, a) for a in ("frame_blocks", "global_blocks", "patch_start_idx"))

    if is_aggregator(getattr(model, "aggregator", None)):
        return model.aggregator, "aggregator."
    for name, mod in model.named_modules():
        if is_aggregator(mod):
            return mod, f"{name}." if name else ""
    return None, ""


def default_layer_names(model: nn.Module) -> list[str]:
    """Inputs of qkv/proj/fc1/fc2 of every aggregator block, in execution order (block i: frame, then global)."""
    agg, prefix = _find_aggregator(model)
    if agg is None:
        raise ValueError("layers='default' needs a VGGT aggregator (frame_blocks/global_blocks); pass layer names")
    modules = dict(model.named_modules())
    names = []
    for i in range(len(agg.frame_blocks)):
        for kind in ("frame", "global"):
            for suffix in DEFAULT_LINEARS:
                name = f"{prefix}{kind}_blocks.{i}.{suffix}"
                if name in modules:
                    names.append(name)
    return names


def _num_to_json(x: float) -> float | str | None:
    """JSON has no NaN/inf: NaN -> null, +-inf -> "inf"/"-inf"."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _num_from_json(x: float | str | None) -> float:
    return math.nan if x is None else float(x)


# ----------------------------------------------------------------------------------------------- moments


@dataclass(eq=False)
class Moments:
    """Per-channel count, mean and central moment sums of a stream of rows ``[N, C]`` (float64 tensors ``[C]``).

    ``m2 = sum (x - mean)^2``, ``m3 = sum (x - mean)^3``, ``m4 = sum (x - mean)^4`` over the rows seen so far.
    """

    n: int
    mean: Tensor
    m2: Tensor
    m3: Tensor
    m4: Tensor

    @classmethod
    def zeros(cls, channels: int, device: torch.device | str | None = None) -> Moments:
        z = partial(torch.zeros, channels, dtype=torch.float64, device=device)
        return cls(0, z(), z(), z(), z())

    @classmethod
    def from_rows(cls, x: Tensor) -> Moments:
        """Two-pass moments of ``x [N, C]`` (any float dtype; computed in float64)."""
        x = x.to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return cls.zeros(x.shape[1], x.device)
        mean = x.mean(0)
        xc = x - mean
        xc2 = xc * xc
        return cls(n, mean, xc2.sum(0), (xc2 * xc).sum(0), (xc2 * xc2).sum(0))

    def merge_(self, other: Moments) -> Moments:
        """Fold ``other`` into ``self`` (pairwise update of Chan et al. / Pebay 2008, eq. 2.1-2.3); returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = (
                other.n,
                other.mean.clone(),
                other.m2.clone(),
                other.m3.clone(),
                other.m4.clone(),
            )
            return self
        na, nb = float(self.n), float(other.n)
        n = na + nb
        d = other.mean - self.mean
        d2 = d * d
        # Right-hand sides use the old m2/m3 of both sides, so m4, then m3, then m2.
        m4 = (
            self.m4
            + other.m4
            + d2 * d2 * (na * nb * (na * na - na * nb + nb * nb) / n**3)
            + 6.0 * d2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
            + 4.0 * d * (na * other.m3 - nb * self.m3) / n
        )
        m3 = self.m3 + other.m3 + d2 * d * (na * nb * (na - nb) / n**2) + 3.0 * d * (na * other.m2 - nb * self.m2) / n
        self.m2 = self.m2 + other.m2 + d2 * (na * nb / n)
        self.m3, self.m4 = m3, m4
        self.mean = self.mean + d * (nb / n)
        self.n += other.n
        return self

    def merged(self, other: Moments) -> Moments:
        """A new ``Moments`` of both streams together."""
        return Moments(self.n, self.mean.clone(), self.m2.clone(), self.m3.clone(), self.m4.clone()).merge_(other)

    def _degenerate(self) -> Tensor:
        # Constant channels: float64 rounding leaves m2 ~ (1e-16 |mean|)^2 * n; shape statistics there are noise.
        var = self.m2 / max(self.n, 1)
        return (self.n < 2) | (var <= (1e-12 * self.mean.abs()) ** 2) | (var == 0)

    def std(self) -> Tensor:
        """Population standard deviation (ddof=0) ``[C]``."""
        return (self.m2 / max(self.n, 1)).clamp_min(0).sqrt()

    def skewness(self) -> Tensor:
        """Population skewness ``sqrt(n) m3 / m2^1.5`` ``[C]``; NaN for constant channels."""
        g = math.sqrt(self.n) * self.m3 / self.m2**1.5
        return g.masked_fill(self._degenerate(), math.nan)

    def kurtosis(self) -> Tensor:
        """EXCESS (Fisher) population kurtosis ``n m4 / m2^2 - 3`` ``[C]``; NaN for constant channels."""
        k = self.n * self.m4 / (self.m2 * self.m2) - 3.0
        return k.masked_fill(self._degenerate(), math.nan)

    def tensors(self) -> list[Tensor]:
        return [self.mean, self.m2, self.m3, self.m4]


# ----------------------------------------------------------------------------------------------- accumulators


class _GroupAccumulator:
    """Running statistics of one token group of one layer; every tensor has a fixed size."""

    def __init__(self, channels: int, num_counts: int, device: torch.device) -> None:
        self.moments = Moments.zeros(channels, device)
        self.absmax = torch.zeros(channels, dtype=torch.float64, device=device)
        self.hist = torch.zeros(num_counts, dtype=torch.int64, device=device)
        self.norm_moments = Moments.zeros(1, device)
        self.norm_max = torch.zeros(1, dtype=torch.float64, device=device)
        self.norm_hist = torch.zeros(num_counts, dtype=torch.int64, device=device)
        self.nonfinite = 0

    def tensors(self) -> list[Tensor]:
        return [
            *self.moments.tensors(),
            self.absmax,
            self.hist,
            *self.norm_moments.tensors(),
            self.norm_max,
            self.norm_hist,
        ]

    def _histogram(self, values: Tensor, edges: Tensor) -> Tensor:
        # right=True: slot i holds edges[i-1] <= v < edges[i]; 0 = underflow, len(edges) = overflow.
        idx = torch.bucketize(values.reshape(-1), edges, right=True)
        return torch.bincount(idx, minlength=self.hist.numel())

    def update(self, rows: Tensor, edges: Tensor) -> None:
        """Fold ``rows [N, C]`` (one float64 chunk) in."""
        if rows.shape[0] == 0:
            return
        self.moments.merge_(Moments.from_rows(rows))
        mag = rows.abs()
        self.absmax = torch.maximum(self.absmax, mag.amax(0))
        finite = torch.isfinite(mag)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            mag = mag[finite]
        self.hist += self._histogram(mag, edges)
        norms = torch.linalg.vector_norm(rows, dim=1)  # [N]
        self.norm_moments.merge_(Moments.from_rows(norms[:, None]))
        self.norm_max = torch.maximum(self.norm_max, norms.amax()[None])
        self.norm_hist += self._histogram(norms[torch.isfinite(norms)], edges)

    def merged(self, other: _GroupAccumulator) -> _GroupAccumulator:
        out = _GroupAccumulator(self.absmax.numel(), self.hist.numel(), self.absmax.device)
        out.moments = self.moments.merged(other.moments)
        out.absmax = torch.maximum(self.absmax, other.absmax)
        out.hist = self.hist + other.hist
        out.norm_moments = self.norm_moments.merged(other.norm_moments)
        out.norm_max = torch.maximum(self.norm_max, other.norm_max)
        out.norm_hist = self.norm_hist + other.norm_hist
        out.nonfinite = self.nonfinite + other.nonfinite
        return out

    def finish(self) -> GroupStats:
        m, nm = self.moments, self.norm_moments

        def np64(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float64)

        return GroupStats(
            count=m.n,
            absmax=np64(self.absmax),
            mean=np64(m.mean),
            std=np64(m.std()),
            skewness=np64(m.skewness()),
            kurtosis=np64(m.kurtosis()),
            hist=self.hist.cpu().numpy().astype(np.int64),
            nonfinite=self.nonfinite,
            norm_max=float(self.norm_max[0]) if nm.n else 0.0,
            norm_mean=float(nm.mean[0]),
            norm_std=float(nm.std()[0]),
            norm_hist=self.norm_hist.cpu().numpy().astype(np.int64),
        )


@dataclass(eq=False)
class _LayerAccumulator:
    channels: int
    split: bool
    groups: dict[str, _GroupAccumulator] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- report


@dataclass(eq=False)
class GroupStats:
    """Statistics of one token group of one layer's input.

    Arrays: ``absmax``, ``mean``, ``std`` (ddof=0), ``skewness``, ``kurtosis`` (EXCESS, Fisher) are ``[C]``
    float64 (shape statistics NaN for constant channels); ``hist`` and ``norm_hist`` are ``[K]`` int64 counts
    of |x| (all channels) and of per-token L2 norms on the report's ``LogBins``. ``count`` is tokens seen;
    ``nonfinite`` the NaN/inf values, which the histograms leave out.
    """

    count: int
    absmax: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    skewness: np.ndarray
    kurtosis: np.ndarray
    hist: np.ndarray
    nonfinite: int
    norm_max: float
    norm_mean: float
    norm_std: float
    norm_hist: np.ndarray

    def summary(self) -> dict[str, float]:
        """Scalars: ``outlier_ratio`` = max / median channel absmax, max / mean excess kurtosis, norms."""
        amax = float(self.absmax.max()) if self.absmax.size else math.nan
        amed = float(np.median(self.absmax)) if self.absmax.size else math.nan
        ratio = amax / amed if amed > 0 else (math.inf if amax > 0 else math.nan)
        finite_k = self.kurtosis[np.isfinite(self.kurtosis)]
        return {
            "max_absmax": amax,
            "median_absmax": amed,
            "outlier_ratio": ratio,
            "max_kurtosis": float(finite_k.max()) if finite_k.size else math.nan,
            "mean_kurtosis": float(finite_k.mean()) if finite_k.size else math.nan,
            "norm_max": self.norm_max,
            "norm_mean": self.norm_mean,
        }


@dataclass(eq=False)
class LayerStats:
    """One layer's input statistics: ``groups`` maps "special"/"patch"/"all" (or just "all") to ``GroupStats``.

    ``kind`` is "frame", "global" or "other"; ``block`` the block index (None for other layers); ``linear`` the
    module's last name component ("qkv", "proj", "fc1", "fc2", ...); ``in_features`` is C.
    """

    name: str
    in_features: int
    groups: dict[str, GroupStats]

    @property
    def kind(self) -> str:
        return parse_layer_name(self.name)[0]

    @property
    def block(self) -> int | None:
        return parse_layer_name(self.name)[1]

    @property
    def linear(self) -> str:
        return parse_layer_name(self.name)[2]

    def summary(self) -> dict[str, dict[str, float]]:
        return {g: s.summary() for g, s in self.groups.items()}


@dataclass(eq=False)
class StatsReport:
    """Per-layer input statistics (``layers``, in collection order), histogram ``bins`` and ``meta``.

    ``meta`` holds the model name, number of forwards (batches) and frames, tokens per frame and image sizes
    seen, ``patch_start_idx`` and conventions; no timestamps or paths, so equal runs save equal files.
    """

    layers: dict[str, LayerStats]
    bins: LogBins
    meta: dict[str, Any]

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """layer -> group -> summary scalars (see ``GroupStats.summary``)."""
        return {name: layer.summary() for name, layer in self.layers.items()}

    def worst_layer(self, metric: str = "max_kurtosis", groups: Sequence[str] = ("special", "patch")) -> str:
        """Name of the layer with the largest ``metric`` over the given groups (``"all"`` where not split)."""
        best, best_val = None, -math.inf
        for name, layer in self.layers.items():
            present = [g for g in groups if g in layer.groups] or ["all"]
            vals = [layer.groups[g].summary()[metric] for g in present]
            val = max((v for v in vals if not math.isnan(v)), default=-math.inf)
            if best is None or val > best_val:
                best, best_val = name, val
        if best is None:
            raise ValueError("the report has no layers")
        return best

    def save(self, path_dir: str | Path) -> Path:
        """Write ``stats.safetensors`` (arrays, keys ``layer/group/field``) and ``stats.json`` (the rest)."""
        from safetensors.numpy import save as st_save

        path_dir = Path(path_dir)
        arrays: dict[str, np.ndarray] = {}
        layers_json = []
        for name, layer in self.layers.items():
            groups_json = {}
            for g, s in layer.groups.items():
                for f in _ARRAY_FIELDS:
                    arrays[f"{name}/{g}/{f}"] = np.ascontiguousarray(getattr(s, f))
                groups_json[g] = {
                    "count": s.count,
                    "nonfinite": s.nonfinite,
                    "norm_max": _num_to_json(s.norm_max),
                    "norm_mean": _num_to_json(s.norm_mean),
                    "norm_std": _num_to_json(s.norm_std),
                    "summary": {k: _num_to_json(v) for k, v in s.summary().items()},
                }
            kind, block, linear = parse_layer_name(name)
            layers_json.append(
                {
                    "name": name,
                    "kind": kind,
                    "block": block,
                    "linear": linear,
                    "in_features": layer.in_features,
                    "groups": groups_json,
                }
            )
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "meta": self.meta,
            "bins": {**self.bins.to_dict(), "num_counts": self.bins.num_counts},
            "arrays": {f: "[C] float64" if f not in ("hist", "norm_hist") else "[K] int64" for f in _ARRAY_FIELDS},
            "layers": layers_json,
        }
        # Arrays first: stats.json acts as the manifest, so a run that dies in between leaves no valid pair.
        with atomic_open(path_dir / "stats.safetensors") as f:
            # One metadata key: safetensors writes its metadata map in hash order, which varies between runs.
            f.write(st_save(arrays, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"}))
        with atomic_open(path_dir / "stats.json", "w") as f:
            f.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        return path_dir

    @classmethod
    def load(cls, path_dir: str | Path) -> StatsReport:
        """Read a report written by ``save``."""
        from safetensors.numpy import load_file

        path_dir = Path(path_dir)
        doc = json.loads((path_dir / "stats.json").read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path_dir / 'stats.json'} is not a {FORMAT} file")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported {FORMAT} version {doc.get('version')} (expected {FORMAT_VERSION})")
        arrays = load_file(str(path_dir / "stats.safetensors"))
        b = doc["bins"]
        layers = {}
        for entry in doc["layers"]:
            name = entry["name"]
            groups = {}
            for g, gj in entry["groups"].items():
                groups[g] = GroupStats(
                    count=int(gj["count"]),
                    nonfinite=int(gj["nonfinite"]),
                    norm_max=_num_from_json(gj["norm_max"]),
                    norm_mean=_num_from_json(gj["norm_mean"]),
                    norm_std=_num_from_json(gj["norm_std"]),
                    **{f: arrays[f"{name}/{g}/{f}"] for f in _ARRAY_FIELDS},
                )
            layers[name] = LayerStats(name, int(entry["in_features"]), groups)
        return cls(layers, LogBins(b["lo"], b["hi"], int(b["per_decade"])), doc["meta"])


# ----------------------------------------------------------------------------------------------- collector


class ActivationStats(HookSet):
    """Streaming collector of layer-input statistics via forward pre-hooks.

    Usage::

        with ActivationStats().attach(model) as stats:   # default: qkv/proj/fc1/fc2 of every aggregator block
            for images in batches:                         # [B, S, 3, H, W]
                model(images)
        report = stats.report()

    ``layout``: if given, EVERY selected layer is split into special/patch with it (tokens on dim -2);
    if None, layers inside the aggregator's frame/global blocks are split with the layout read from the
    aggregator's input images, and other layers are recorded as "all". Inputs of ``nn.Conv*`` layers have
    their channels moved last; for any other module the last dim is the channel dim.
    """

    def __init__(
        self,
        bins: LogBins | None = None,
        layout: TokenLayout | None = None,
        chunk_elements: int = _CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        self.bins = bins or LogBins()
        self.layout = layout
        self.chunk_elements = int(chunk_elements)
        self.aggregator: nn.Module | None = None
        self.layer_names: list[str] = []
        self.prefix = ""
        self._layers: dict[str, _LayerAccumulator] = {}
        self._edges: dict[torch.device, Tensor] = {}
        self._auto_layout: TokenLayout | None = None
        self._model_name = "unknown"
        self._num_forwards = 0
        self._num_frames = 0
        self._tokens_per_frame: set[int] = set()
        self._image_hw: set[tuple[int, int]] = set()

    # -- hooks

    def attach(self, model: nn.Module, layers: Literal["default"] | Sequence[str] = "default") -> ActivationStats:
        """Register pre-hooks on the inputs of ``layers`` (module names of ``model``); returns self."""
        if self.attached:
            raise RuntimeError("already attached; call remove() first")
        self.aggregator, self.prefix = _find_aggregator(model)
        cfg = getattr(model, "cfg", None)
        self._model_name = str(getattr(cfg, "name", None) or type(model).__name__)
        modules = dict(model.named_modules())
        if isinstance(layers, str) and layers != "default":
            raise ValueError(f"layers must be 'default' or a list of module names, got {layers!r}")
        names = default_layer_names(model) if layers == "default" else list(layers)
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[:3]} in the model (e.g. {next(iter(modules.keys()), '')!r})")
        if not names:
            raise ValueError("no layers selected")
        self.layer_names = names
        for name in names:
            hook = partial(
                self._on_input, name, self._is_split(name), isinstance(modules[name], (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            )
            self._add_hook(modules[name].register_forward_pre_hook(hook))
        top = self.aggregator if self.aggregator is not None else model
        self._add_hook(top.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        return self

    def _is_split(self, name: str) -> bool:
        if self.layout is not None:
            return True
        if self.aggregator is None:
            return False
        return name.startswith((f"{self.prefix}frame_blocks.", f"{self.prefix}global_blocks."))

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Count forwards; on the aggregator also read the images' size -> tokens per frame."""
        self._num_forwards += 1
        if module is not self.aggregator:
            return
        images = args[0] if args else kwargs.get("images")
        if not isinstance(images, Tensor) or images.dim() != 5:
            return
        B, S, _, H, W = images.shape
        P = tokens_per_frame(module, images)
        self._auto_layout = TokenLayout(module.patch_start_idx, P)
        self._num_frames += B * S
        self._tokens_per_frame.add(P)
        self._image_hw.add((H, W))

    def _on_input(self, name: str, split: bool, conv: bool, module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, Tensor)), None)
        if x is None or not x.is_floating_point():
            return
        with torch.no_grad():
            x = x.detach()
            if conv:
                x = x.movedim(1, -1)
            if x.dim() == 1:
                x = x[None]
            C = x.shape[-1]
            acc = self._layers.get(name)
            if acc is None:
                acc = _LayerAccumulator(C, split)
                for g in ("special", "patch") if split else ("all",):
                    acc.groups[g] = _GroupAccumulator(C, self.bins.num_counts, x.device)
                self._layers[name] = acc
            elif acc.channels != C:
                raise ValueError(f"{name}: input has {C} channels, earlier inputs had {acc.channels}")
            if not split:
                self._update(acc.groups["all"], x.reshape(-1, C))
                return
            layout = self.layout or self._auto_layout
            if layout is None:
                raise RuntimeError(f"{name}: token layout unknown (no aggregator forward seen); pass layout=")
            P, ps = layout.tokens_per_frame, layout.patch_start_idx
            if x.dim() < 2 or x.shape[-2] % P:
                raise ValueError(
                    f"{name}: input {tuple(x.shape)} has no whole frames of {P} tokens on dim -2 "
                    "(is the layout right, or is this layer outside the token sequence?)"
                )
            frames = x.reshape(-1, P, C)  # [B*S, P, C] for frame and global blocks alike
            self._update(acc.groups["special"], frames[:, :ps].reshape(-1, C))
            self._update(acc.groups["patch"], frames[:, ps:].reshape(-1, C))

    def _update(self, group: _GroupAccumulator, rows: Tensor) -> None:
        edges = self._edges.get(rows.device)
        if edges is None:
            edges = self._edges[rows.device] = torch.as_tensor(self.bins.edges(), device=rows.device)
        step = max(1, self.chunk_elements // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            group.update(rows[start : start + step].to(torch.float64), edges)

    # -- results

    def state_nbytes(self) -> int:
        """Bytes held by the accumulators' tensors (independent of how many batches were seen)."""
        return sum(
            t.numel() * t.element_size() for a in self._layers.values() for g in a.groups.values() for t in g.tensors()
        )

    def report(self) -> StatsReport:
        """Freeze the accumulators into a ``StatsReport`` (on CPU); collection may go on afterwards."""
        layers = {}
        for name in self.layer_names:
            acc = self._layers.get(name)
            if acc is None:
                continue
            groups = {g: a.finish() for g, a in acc.groups.items()}
            if acc.split:
                groups["all"] = acc.groups["special"].merged(acc.groups["patch"]).finish()
            layers[name] = LayerStats(name, acc.channels, groups)
        layout = self.layout or self._auto_layout
        meta = {
            "model": self._model_name,
            "num_batches": self._num_forwards,
            "num_frames": self._num_frames,
            "tokens_per_frame": sorted(self._tokens_per_frame) or ([layout.tokens_per_frame] if layout else []),
            "image_hw": [list(hw) for hw in sorted(self._image_hw)],
            "patch_start_idx": layout.patch_start_idx if layout else None,
            "layers_not_seen": [n for n in self.layer_names if n not in self._layers],
            "groups": "special = camera + register tokens (index < patch_start_idx in each frame), patch = the rest, "
            "all = both",
            "std": "population (ddof=0)",
            "kurtosis": "excess (Fisher): n*m4/m2^2 - 3 from population moments; NaN for constant channels",
            "hist": "counts of |x| (all channels) and of token L2 norms: [< lo, log bins..., >= hi]",
        }
        return StatsReport(layers, self.bins, meta)


def _batches_on(batches: Iterable[Tensor], device: torch.device) -> Iterator[Tensor]:
    for images in batches:
        images = images.to(device)
        yield images.unsqueeze(0) if images.dim() == 4 else images


def collect_stats(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: Literal["default"] | Sequence[str] = "default",
    *,
    dtype: torch.dtype = torch.float32,
    bins: LogBins | None = None,
    layout: TokenLayout | None = None,
) -> StatsReport:
    """Run ``model`` over ``batches`` (images ``[B, S, 3, H, W]`` or ``[S, 3, H, W]`` in [0, 1]) under no_grad
    in eval mode and return the input statistics of ``layers``.

    When every selected layer lies inside the aggregator, only the aggregator runs (heads skipped, no layer
    outputs kept); for a VGGT through ``VGGT.aggregate``, so correspondence tokens enter as in ``model(images)``.
    ``dtype`` other than float32 runs it under autocast, as VGGT inference does.
    """
    stats = ActivationStats(bins, layout)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), stats.attach(model, layers):
            agg = stats.aggregator
            agg_only = agg is not None and (agg is model or all(n.startswith(stats.prefix) for n in stats.layer_names))
            # A VGGT feeds its aggregator through ``aggregate`` (correspondence-token offsets enter the patch
            # tokens there); calling the aggregator alone would record activations the model never produces.
            via_model = agg is not model and agg is getattr(model, "aggregator", None) and hasattr(model, "aggregate")
            for images in _batches_on(batches, device):
                if agg_only:
                    # Autocast as VGGT.forward applies it to the aggregator; keep_layers=() keeps no outputs.
                    use_amp = dtype != torch.float32 and device.type in ("cpu", "cuda")
                    with torch.autocast(device.type, dtype=dtype) if use_amp else nullcontext():
                        if via_model:
                            model.aggregate(images, (), {})
                        else:
                            agg(images, keep_layers=())
                elif hasattr(model, "aggregator"):
                    model(images, dtype=dtype)
                else:
                    model(images)
    finally:
        model.train(was_training)
    return stats.report()
