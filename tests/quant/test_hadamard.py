"""Fast / randomized Hadamard transforms: agreement with dense matrices, orthogonality, seeds, weight folding."""

from __future__ import annotations

import json

import pytest
import scipy.linalg
import torch
from qvggt_testing import rel_l2
from torch import nn

from qvggt.quant.hadamard import (
    SMALL_HADAMARD_ORDERS,
    RandomizedHadamard,
    dense,
    fwht,
    hadamard_factors,
    hadamard_transform,
    is_supported_width,
    random_signs,
    rotate_linear_input_,
    rotate_linear_output_,
    small_hadamard,
)

NON_POW2 = [12, 20, 28, 24, 40, 56, 96]
ROTATION_WIDTHS = [12, 20, 28, 24, 40, 56, 64, 96]


def _randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024, 4096])
def test_fwht_matches_sylvester_matmul(n: int) -> None:
    x = _randn(3, n)
    h = torch.from_numpy(scipy.linalg.hadamard(n, dtype=float))
    ref = x @ h
    assert rel_l2(fwht(x, normalize=False), ref) < 1e-13
    assert rel_l2(fwht(x), ref / n**0.5) < 1e-13
    if n > 1:  # x @ H is not H @ x for a row-batch: a wrong axis must show up
        assert rel_l2(fwht(x.T.contiguous(), dim=0).T, ref / n**0.5) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2, 64, 1024])
def test_fwht_orthonormal_involution(n: int, dtype: torch.dtype) -> None:
    x = _randn(5, n, dtype=dtype)
    y = fwht(x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.dtype == dtype
    assert rel_l2(y.norm(dim=-1), x.norm(dim=-1)) < tol
    assert rel_l2(fwht(y), x) < tol


def test_fwht_other_dim_and_non_contiguous() -> None:
    x = _randn(4, 16, 6)
    ref = fwht(x.transpose(1, 2).contiguous()).transpose(1, 2)
    assert rel_l2(fwht(x, dim=1), ref) < 1e-14
    xt = _randn(16, 8).T  # non-contiguous view, transform along its last dim
    assert rel_l2(fwht(xt), fwht(xt.contiguous())) < 1e-14


@pytest.mark.parametrize("m", SMALL_HADAMARD_ORDERS)
def test_small_hadamard_is_hadamard(m: int) -> None:
    h = small_hadamard(m).to(torch.int64)
    assert h.shape == (m, m)
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


def test_paley_one_is_not_symmetric() -> None:
    # Makes the transpose checks below meaningful: x @ H and x @ H^T differ for these widths.
    assert not torch.equal(small_hadamard(12), small_hadamard(12).T)
    assert torch.equal(small_hadamard(28), small_hadamard(28).T)  # Paley II is symmetric


@pytest.mark.parametrize("n", NON_POW2 + [64])
def test_hadamard_transform_matches_dense(n: int) -> None:
    h = dense(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    x = _randn(3, n)
    assert rel_l2(hadamard_transform(x), x @ h / n**0.5) < 1e-13
    assert rel_l2(hadamard_transform(x, transpose=True), x @ h.T / n**0.5) < 1e-13
    assert rel_l2(hadamard_transform(hadamard_transform(x), transpose=True), x) < 1e-13
    assert rel_l2(hadamard_transform(x, normalize=False), x @ h) < 1e-13


@pytest.mark.parametrize("n", ROTATION_WIDTHS)
def test_randomized_rotation_orthogonal(n: int) -> None:
    rot = RandomizedHadamard(n, seed=3)
    q = rot.dense()
    assert rel_l2(q @ q.T, torch.eye(n, dtype=torch.float64)) < 1e-13
    # Definition: Q = H diag(s) / sqrt(n)
    assert rel_l2(q, dense(n) * rot.signs().double() / n**0.5) < 1e-13
    x = _randn(4, n)
    assert rel_l2(rot.apply(x), x @ q) < 1e-13
    assert rel_l2(rot.apply_inverse(x), x @ q.T) < 1e-13
    assert rel_l2(rot.apply_inverse(rot.apply(x)), x) < 1e-13
    assert rel_l2(rot.apply(x).norm(dim=-1), x.norm(dim=-1)) < 1e-13


def test_signs_deterministic_per_seed() -> None:
    a, b, c = random_signs(64, 7), random_signs(64, 7), random_signs(64, 8)
    assert a.dtype == torch.int8 and set(a.tolist()) <= {-1, 1}
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(random_signs(16, None), torch.ones(16, dtype=torch.int8))
    # Pinned bits: a torch RNG change would silently change every stored rotation.
    pinned = [-1, 1, 1, -1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 1, -1, -1]
    assert random_signs(32, 0)[:16].tolist() == pinned
    # Same rotation on every call, and a different seed gives a different Q.
    x = _randn(2, 24)
    assert torch.equal(RandomizedHadamard(24, 5).apply(x), RandomizedHadamard(24, 5).apply(x))
    assert rel_l2(RandomizedHadamard(24, 5).apply(x), RandomizedHadamard(24, 6).apply(x)) > 0.1


def test_signs_not_built_on_default_device() -> None:
    # A model built under `with torch.device("meta")` must still get real signs (seed unused elsewhere: no cache hit).
    with torch.device("meta"):
        s = RandomizedHadamard(48, 987_654).signs()
    ref = 2 * torch.randint(0, 2, (48,), generator=torch.Generator().manual_seed(987_654)) - 1
    assert s.device.type == "cpu" and s.tolist() == ref.tolist()
    small_hadamard.cache_clear()
    with torch.device("meta"):
        h12, ones = small_hadamard(12), RandomizedHadamard(40, None).signs()
    assert h12.device.type == "cpu" and ones.device.type == "cpu" and ones.tolist() == [1] * 40
    assert torch.equal(h12.long() @ h12.long().T, 12 * torch.eye(12, dtype=torch.long))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("d_in", "d_out"), [(96, 40), (64, 28), (20, 64)])
def test_fold_input_rotation(d_in: int, d_out: int, dtype: torch.dtype, tol: float) -> None:
    lin = nn.Linear(d_in, d_out, bias=True).to(dtype)
    x = _randn(7, d_in, dtype=dtype)
    rot = RandomizedHadamard(d_in, seed=1)
    with torch.no_grad():
        ref = lin(x)
        assert rotate_linear_input_(lin, rot) is lin
        out = lin(rot.apply(x))
    assert lin.weight.dtype == dtype
    assert rel_l2(out, ref) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("d_in", "d_out"), [(40, 96), (64, 28), (28, 64)])
def test_fold_output_rotation(d_in: int, d_out: int, dtype: torch.dtype, tol: float) -> None:
    lin = nn.Linear(d_in, d_out, bias=True).to(dtype)
    x = _randn(7, d_in, dtype=dtype)
    rot = RandomizedHadamard(d_out, seed=2)
    with torch.no_grad():
        ref = lin(x)
        rotate_linear_output_(lin, rot)
        out = lin(x)
    assert rel_l2(out, rot.apply(ref)) < tol
    assert rel_l2(rot.apply_inverse(out), ref) < tol


def test_fold_pair_cancels_without_online_op() -> None:
    # l1 output rotated, l2 input rotated by the same Q: the composition is unchanged (the common folded case).
    l1, l2 = nn.Linear(32, 48).double(), nn.Linear(48, 16).double()
    x = _randn(5, 32)
    rot = RandomizedHadamard(48, seed=9)
    with torch.no_grad():
        ref = l2(l1(x))
        rotate_linear_output_(l1, rot)
        rotate_linear_input_(l2, rot)
        assert rel_l2(l2(l1(x)), ref) < 1e-12


def test_fold_width_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="width 64"):
        rotate_linear_input_(nn.Linear(32, 64), RandomizedHadamard(64))
    with pytest.raises(ValueError, match="width 32"):
        rotate_linear_output_(nn.Linear(32, 64), RandomizedHadamard(32))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [96, 1024])
def test_half_input_keeps_dtype(n: int, half: torch.dtype) -> None:
    x = _randn(8, n, dtype=torch.float32).to(half)
    rot = RandomizedHadamard(n, seed=4)
    for fn in (rot.apply, rot.apply_inverse, hadamard_transform):
        out = fn(x)
        assert out.dtype == half
        assert rel_l2(out, fn(x.float())) < 1e-2
        # Computed in float32 and rounded once at the end, not at each of the log2(n) butterfly stages.
        assert torch.equal(out, fn(x.float()).to(half))


def test_gradient_is_transpose() -> None:
    rot = RandomizedHadamard(24, seed=0)
    x = _randn(2, 24).requires_grad_()
    assert torch.autograd.gradcheck(rot.apply, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: fwht(t), (_randn(2, 16).requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("n", [7, 3, 6, 10, 52, 92, 0])
def test_unsupported_width_raises(n: int) -> None:
    assert not is_supported_width(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        RandomizedHadamard(n)
    if n > 0:
        with pytest.raises(ValueError, match=f"width {n}"):
            hadamard_transform(torch.zeros(2, n))


def test_error_messages_are_specific() -> None:
    with pytest.raises(ValueError, match=r"2\^k \* m"):
        hadamard_factors(7)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="last dim"):
        RandomizedHadamard(16).apply(torch.zeros(3, 32))
    with pytest.raises(TypeError, match="floating"):
        fwht(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="seed"):
        RandomizedHadamard(16, seed=-1)


def test_factors() -> None:
    assert hadamard_factors(1024) == (1, 1024)
    assert hadamard_factors(3072) == (12, 256)
    assert hadamard_factors(40) == (20, 2)
    assert hadamard_factors(28) == (28, 1)


def test_serialisation_roundtrip() -> None:
    rot = RandomizedHadamard(4096, seed=123)
    d = json.loads(json.dumps(rot.to_dict()))
    assert d == {"kind": "randomized_hadamard", "version": 1, "n": 4096, "seed": 123}
    assert RandomizedHadamard.from_dict(d) == rot
    assert RandomizedHadamard.from_dict(RandomizedHadamard(12, None).to_dict()).seed is None
    with pytest.raises(ValueError, match="kind"):
        RandomizedHadamard.from_dict({**d, "kind": "dense"})
    with pytest.raises(ValueError, match="keys"):
        RandomizedHadamard.from_dict({**d, "matrix": [1.0]})


@pytest.mark.parametrize("n", [1024, 2048, 3072, 4096, 8192])
def test_vggt_widths(n: int) -> None:
    x = _randn(4, n, dtype=torch.float32)
    rot = RandomizedHadamard(n, seed=0)
    y = rot.apply(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert rel_l2(y.norm(dim=-1), x.norm(dim=-1)) < 1e-5
    assert rel_l2(rot.apply_inverse(y), x) < 1e-5


def test_outlier_is_spread() -> None:
    # The point of the rotation: one huge channel becomes n channels of magnitude |x| / sqrt(n).
    x = torch.zeros(1, 1024)
    x[0, 17] = 100.0
    y = RandomizedHadamard(1024, seed=0).apply(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 32))


@pytest.mark.cuda  # deselected where there is no GPU (tests/conftest.py); run by scripts/gpu_check.sh
def test_cuda_matches_cpu() -> None:
    rot = RandomizedHadamard(3072, seed=11)
    x = _randn(16, 3072, dtype=torch.float32)
    y = rot.apply(x.cuda())
    assert y.device.type == "cuda"
    assert rel_l2(y.cpu(), rot.apply(x)) < 1e-6
    assert rel_l2(rot.apply_inverse(y).cpu(), x) < 1e-6
