"""Fast and randomized Hadamard transforms: rotations that cost O(n log n) and are stored as a seed, never a matrix.

A rotation Q [n, n] spreads activation outliers over all channels before quantisation. The published QuantVGGT keeps
one dense fp32 matrix per linear (1024^2 or 4096^2 entries, ~3.8 GB in all) and multiplies by it online. Here a
rotation is (n, seed): the Hadamard part is a fast Walsh-Hadamard transform (FWHT), the random part a sign vector
regenerated from the seed.

Cost per activation vector of width n:
- FWHT: n log2(n) additions/subtractions (log2(n) butterfly stages over the whole tensor) plus one scaling pass;
  n = 4096: ~49k adds, versus n^2 = 16.8M multiply-adds for a dense x @ Q (~340x fewer operations).
- n = 2^k * m (m in SMALL_HADAMARD_ORDERS): FWHT of size 2^k plus a dense [m, m] matmul, i.e. n (log2(2^k) + m).
- Memory: the sign vector (n bytes as int8, or the n-vector of the compute dtype) against n^2 * 4 bytes for a dense
  fp32 matrix (64 MiB at n = 4096).
The butterflies are memory-bound elementwise passes in pure torch; a fused kernel (one pass) belongs in
qvggt/kernels with this module as its torch twin.

Conventions (row vectors, as activations are stored): with H [n, n] the unnormalised +-1 Hadamard matrix of order n
(`dense(n)`), `hadamard_transform(x)` = x @ H / sqrt(n) and `hadamard_transform(x, transpose=True)` =
x @ H^T / sqrt(n). For n a power of two H is Sylvester's (scipy.linalg.hadamard ordering), symmetric, so the
normalised transform is its own inverse. For n = 2^k * m, H = H_m kron H_{2^k} with H_m a Paley matrix, which need
not be symmetric: invert with `transpose=True`.

Randomized rotation: Q = H diag(s) / sqrt(n), s in {+-1}^n from `seed`; Q is orthogonal, Q Q^T = I.
Weight folding for nn.Linear (y = x W^T + b, W [out, in]) keeps the network function unchanged:
- input rotation, x' = x Q:   W' = W Q                 (`rotate_linear_input_`)
- output rotation, y' = y Q:  W' = Q^T W, b' = b Q     (`rotate_linear_output_`)
A folded rotation costs nothing at inference; an online rotation (`RandomizedHadamard.apply` on activations) costs
one FWHT per token. Callers keep the two kinds apart.

Dtypes: float32 and float64 compute in their own dtype; float16/bfloat16 (and other narrower floats) are upcast to
float32 for the transform and cast back, so the output is rounded once rather than at each of the log2(n) stages.

Shape legend: ... any leading dims; n transform width (the transformed dim); m small Hadamard order; p = n / m,
a power of two.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SMALL_HADAMARD_CONSTRUCTIONS",
    "SMALL_HADAMARD_ORDERS",
    "RandomizedHadamard",
    "block_hadamard_transform",
    "dense",
    "fwht",
    "hadamard_factors",
    "hadamard_transform",
    "is_supported_width",
    "random_signs",
    "rotate_linear_input_",
    "rotate_linear_output_",
    "small_hadamard",
]

# Order m -> (construction, q). Paley I: q prime = 3 mod 4, order q + 1. Paley II: q prime = 1 mod 4, order
# 2 (q + 1). Only m = 4 * odd is listed: powers of two in a width go to the FWHT, so these are all the m needed.
# Covers QuaRot's orders except 52, 156 and 172 (those need Williamson-type constructions).
SMALL_HADAMARD_CONSTRUCTIONS: dict[int, tuple[str, int]] = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    44: ("paley1", 43),
    60: ("paley1", 59),
    68: ("paley1", 67),
    76: ("paley2", 37),
    84: ("paley1", 83),
    108: ("paley1", 107),
    124: ("paley2", 61),
    132: ("paley1", 131),
    140: ("paley1", 139),
}
SMALL_HADAMARD_ORDERS: tuple[int, ...] = tuple(sorted(SMALL_HADAMARD_CONSTRUCTIONS))

_SERIAL_KIND = "randomized_hadamard"
_SERIAL_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Small dense Hadamard matrices (Paley constructions)
# ---------------------------------------------------------------------------------------------------------------------


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix [q, q] int64 of the prime q: J[i, j] = chi(j - i), chi the quadratic character mod q."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({(a * a) % q for a in range(1, q)}))] = 1
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> Tensor:
    """Paley I: H = I + S [q+1, q+1], S = [[0, 1^T], [-1, J]] skew-symmetric with S S^T = q I (q = 3 mod 4)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.int64) + s


def _paley2(q: int) -> Tensor:
    """Paley II: H = C kron [[1, -1], [-1, -1]] + I kron [[1, 1], [1, -1]] [2(q+1), 2(q+1)], q = 1 mod 4.

    C = [[0, 1^T], [1, J]] is a symmetric conference matrix (C C^T = q I), so the cross terms cancel and
    H H^T = 2 q I + 2 I.
    """
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


@functools.cache
def small_hadamard(m: int) -> Tensor:
    """Unnormalised Hadamard matrix [m, m] int8 (CPU, +-1 entries, H H^T = m I) for m in {1} + SMALL_HADAMARD_ORDERS.

    The result is cached and shared: do not modify it in place.
    """
    if m != 1 and m not in SMALL_HADAMARD_CONSTRUCTIONS:
        raise ValueError(f"no small Hadamard matrix of order {m}; known orders: {SMALL_HADAMARD_ORDERS}")
    # Explicit CPU: a model may be built under `with torch.device("meta")`, and a meta matrix would be cached.
    with torch.device("cpu"):
        if m == 1:
            return torch.ones(1, 1, dtype=torch.int8)
        kind, q = SMALL_HADAMARD_CONSTRUCTIONS[m]
        h = _paley1(q) if kind == "paley1" else _paley2(q)
        # Cheap guard (once per order): a wrong table entry must fail loudly, not rotate non-orthogonally.
        if h.shape != (m, m) or not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)):
            raise RuntimeError(f"{kind} construction with q={q} did not give a Hadamard matrix of order {m}")
        return h.to(torch.int8)


@functools.lru_cache(maxsize=64)
def _small_hadamard_on(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Cached per (dtype, device) so an online CUDA rotation does not copy H_m host-to-device on every call.
    return small_hadamard(m).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Widths
# ---------------------------------------------------------------------------------------------------------------------


def _supported_forms() -> str:
    return f"2^k, or 2^k * m with k >= 0 and m in {SMALL_HADAMARD_ORDERS}"


def hadamard_factors(n: int) -> tuple[int, int]:
    """Width n -> (m, p) with n = m * p, p a power of two and m = 1 or m in SMALL_HADAMARD_ORDERS.

    The split is unique: m = 4 * (odd part of n), or m = 1 for a power of two. Raises ValueError otherwise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"no Hadamard transform for width {n!r}: the width must be a positive int")
    twos = (n & -n).bit_length() - 1  # exponent of 2 in n
    odd = n >> twos
    if odd == 1:
        return 1, n
    m = 4 * odd
    if twos < 2 or m not in SMALL_HADAMARD_CONSTRUCTIONS:
        raise ValueError(f"no Hadamard transform for width {n}: supported widths are {_supported_forms()}")
    return m, n // m


def is_supported_width(n: int) -> bool:
    """Whether `hadamard_transform` / `RandomizedHadamard` accept width n."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"Hadamard transforms need a floating-point tensor, got {dtype}")
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _fwht_last(x: Tensor) -> Tensor:
    """Unnormalised FWHT along the last dim (power-of-two width p): [..., p] -> [..., p], x @ H_p (Sylvester).

    Stage with stride h pairs entries whose index differs only in bit h: (a, b) -> (a + b, a - b). Building the
    output with stack (not in-place `out=`) keeps it differentiable, which block-wise calibration needs.
    """
    p = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.reshape(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def _transform_last(x: Tensor, m: int, p: int, transpose: bool) -> Tensor:
    """x [..., m*p] (compute dtype) -> x @ H [..., m*p] (or x @ H^T), H = H_m kron H_p, unnormalised.

    Row-major X [..., m, p]: x @ (A kron B) = vec(A^T X B). B (Sylvester) is symmetric, so only A gets transposed.
    """
    lead = x.shape[:-1]
    y = x.reshape(*lead, m, p)
    if p > 1:
        y = _fwht_last(y)
    if m > 1:
        hm = _small_hadamard_on(m, y.dtype, y.device)
        y = (hm if transpose else hm.T) @ y
    return y.reshape(*lead, m * p)


def hadamard_transform(x: Tensor, dim: int = -1, normalize: bool = True, transpose: bool = False) -> Tensor:
    """Hadamard transform along `dim`: x @ H / sqrt(n) (x @ H^T / sqrt(n) with transpose), any supported width.

    x [..., n, ...] -> same shape and dtype. n = 2^k or 2^k * m (see `hadamard_factors`); H = `dense(n)`.
    normalize=True divides by sqrt(n), making the map orthonormal: its inverse is the call with `transpose`
    flipped (for powers of two H is symmetric and the transform is its own inverse).
    Half types are computed in float32 and cast back.
    """
    if x.ndim == 0:
        raise ValueError("a Hadamard transform needs at least one dimension")
    out_dtype = x.dtype
    work = x.to(_compute_dtype(out_dtype))
    dim = dim % x.ndim
    n = x.shape[dim]
    m, p = hadamard_factors(n)
    moved = dim != x.ndim - 1
    if moved:
        work = work.movedim(dim, -1)
    y = _transform_last(work, m, p, transpose)
    if normalize and n > 1:
        y = y / math.sqrt(n)
    if moved:
        y = y.movedim(-1, dim)
    return y.to(out_dtype)


def fwht(x: Tensor, dim: int = -1, normalize: bool = True) -> Tensor:
    """Fast Walsh-Hadamard transform along `dim` for a power-of-two width n: x @ H_n (/ sqrt(n) if normalize).

    x [..., n] -> [..., n], same dtype. H_n is Sylvester's matrix (scipy.linalg.hadamard ordering), symmetric, so
    the normalised transform is orthonormal and its own inverse. O(n log n): log2(n) butterfly stages.
    Half types are computed in float32 and cast back. Other widths: `hadamard_transform`.
    """
    n = x.shape[dim] if x.ndim else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two width, got {n}; use hadamard_transform for 2^k * m widths")
    return hadamard_transform(x, dim=dim, normalize=normalize)


def dense(n: int, normalize: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense Hadamard matrix H [n, n] (+-1, or / sqrt(n) if normalize) in the ordering `hadamard_transform` uses.

    TEST/DEBUG UTILITY ONLY: it materialises n^2 entries (64 MiB fp32 at n = 4096), exactly what this module
    exists to avoid. Never store or multiply by it in a model.
    """
    m, p = hadamard_factors(n)
    sylvester = _fwht_last(torch.eye(p, dtype=torch.float64))
    h = torch.kron(small_hadamard(m).to(torch.float64), sylvester)
    if normalize:
        h = h / math.sqrt(n)
    return h.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Randomized Hadamard rotation
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _random_signs_cpu(n: int, seed: int | None) -> Tensor:
    # Explicit CPU (also against an outer `with torch.device("meta")`), CPU Mersenne-Twister generator: the same
    # bits on every machine, whatever device the rotation later runs on.
    if seed is None:
        return torch.ones(n, dtype=torch.int8, device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64, device="cpu")
    return (2 * bits - 1).to(torch.int8)


def random_signs(n: int, seed: int | None) -> Tensor:
    """Sign vector s [n] int8 (CPU) in {-1, +1}, reproducible from `seed`; seed None gives all +1 (plain H)."""
    return _random_signs_cpu(n, seed).clone()


@functools.lru_cache(maxsize=128)
def _scaled_signs(n: int, seed: int | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    # s / sqrt(n) in the compute dtype, cached per device: one fused multiply per call, no host-to-device copy.
    return (_random_signs_cpu(n, seed).to(torch.float64) / math.sqrt(n)).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class RandomizedHadamard:
    """Orthogonal rotation Q = H diag(s) / sqrt(n) [n, n], stored as (n, seed); Q is never materialised.

    n: width (2^k or 2^k * m, see `hadamard_factors`). seed: sign seed (s from `random_signs`); None means s = 1,
    i.e. the plain normalised Hadamard matrix. Not an nn.Module on purpose: `apply(x)` would shadow
    nn.Module.apply(fn) and break `model.apply(init_fn)` on any parent. Online callers wrap it in their own module.

    apply(x) = x @ Q, apply_inverse(x) = x @ Q^T, both on the last dim: x [..., n] -> [..., n], same dtype and device
    as x. Cost O(n log n) per row (see the module docstring).
    """

    n: int
    seed: int | None = 0

    def __post_init__(self) -> None:
        hadamard_factors(self.n)  # raises ValueError naming the width and the supported forms
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be None or an int in [0, 2^63), got {self.seed!r}")

    def signs(self) -> Tensor:
        """s [n] int8 on CPU (a copy)."""
        return random_signs(self.n, self.seed)

    def _check(self, x: Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ValueError(f"rotation of width {self.n} got a tensor of shape {tuple(x.shape)} (last dim must match)")

    def apply(self, x: Tensor) -> Tensor:
        """x [..., n] -> x @ Q [..., n] (rotate activations). Half types computed in float32, cast back."""
        self._check(x)
        m, p = hadamard_factors(self.n)
        work = x.to(_compute_dtype(x.dtype))
        y = _transform_last(work, m, p, transpose=False) * _scaled_signs(self.n, self.seed, work.dtype, work.device)
        return y.to(x.dtype)

    def apply_inverse(self, x: Tensor) -> Tensor:
        """x [..., n] -> x @ Q^T [..., n] (undo `apply`). Half types computed in float32, cast back."""
        self._check(x)
        m, p = hadamard_factors(self.n)
        work = x.to(_compute_dtype(x.dtype))
        y = _transform_last(work * _scaled_signs(self.n, self.seed, work.dtype, work.device), m, p, transpose=True)
        return y.to(x.dtype)

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Q [n, n] materialised (I @ Q). TEST/DEBUG UTILITY ONLY, like the module-level `dense`."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: {"kind", "version", "n", "seed"}."""
        return {"kind": _SERIAL_KIND, "version": _SERIAL_VERSION, "n": self.n, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RandomizedHadamard:
        """Inverse of `to_dict`; raises ValueError on another kind, an unknown version or extra keys."""
        if d.get("kind") != _SERIAL_KIND:
            raise ValueError(f"expected kind {_SERIAL_KIND!r}, got {d.get('kind')!r}")
        if d.get("version") != _SERIAL_VERSION:
            raise ValueError(f"unsupported {_SERIAL_KIND} version {d.get('version')!r} (known: {_SERIAL_VERSION})")
        extra = set(d) - {"kind", "version", "n", "seed"}
        if extra or "n" not in d:
            raise ValueError(f"bad {_SERIAL_KIND} dict keys: {sorted(d)}")
        return cls(n=d["n"], seed=d.get("seed"))


# ---------------------------------------------------------------------------------------------------------------------
# Weight folding (offline rotations)
# ---------------------------------------------------------------------------------------------------------------------


def _check_linear(linear: nn.Module, features: int, rotation: RandomizedHadamard, side: str) -> None:
    if features != rotation.n:
        raise ValueError(f"{side} rotation of width {rotation.n} does not fit {linear} ({side} features {features})")


@torch.no_grad()
def rotate_linear_input_(linear: nn.Linear, rotation: RandomizedHadamard) -> nn.Linear:
    """Fold an input rotation in place: for inputs x' = x Q, set W' = W Q so that x' W'^T = x W^T. Bias unchanged.

    linear: y = x W^T + b, W [out, in], in == rotation.n. Computed in float64, cast back to the weight dtype.
    Returns the same module.
    """
    w = linear.weight
    _check_linear(linear, w.shape[1], rotation, "input")
    w.copy_(rotation.apply(w.to(torch.float64)))
    return linear


@torch.no_grad()
def rotate_linear_output_(linear: nn.Linear, rotation: RandomizedHadamard) -> nn.Linear:
    """Fold an output rotation in place: y' = y Q, via W' = Q^T W and b' = b Q.

    linear: y = x W^T + b, W [out, in], out == rotation.n. Computed in float64, cast back. Returns the same module.
    """
    w = linear.weight
    _check_linear(linear, w.shape[0], rotation, "output")
    w.copy_(rotation.apply(w.to(torch.float64).T).T)  # (Q^T W)^T = W^T Q
    if linear.bias is not None:
        linear.bias.copy_(rotation.apply(linear.bias.to(torch.float64)))
    return linear


def block_hadamard_transform(x: Tensor, block: int) -> Tensor:
    """Orthonormal Hadamard transform of each consecutive block of ``block`` channels of the last dim.

    x [..., K] with K a multiple of ``block`` (a power of two) -> same shape and dtype. The block-diagonal
    rotation blockdiag(H_b, ..., H_b) / sqrt(b) is symmetric and its own inverse. A block of 128 matches a GEMM's
    output tile, so the engine can apply it to a tile in the epilogue before quantizing.
    """
    k = x.shape[-1]
    if block <= 0 or block & (block - 1) or k % block:
        raise ValueError(f"block Hadamard needs a power-of-two block dividing the width {k}, got {block}")
    return hadamard_transform(x.reshape(*x.shape[:-1], k // block, block)).reshape(x.shape)
