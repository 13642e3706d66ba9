"""The meta-device peak-memory estimate accounts for what it claims to."""

from __future__ import annotations

from qvggt.model import get_preset
from qvggt.model.memory import estimate_peak_memory


def test_keeping_four_layers_saves_exactly_the_dropped_layers() -> None:
    cfg = get_preset("vggt-1b")
    S, H, W = 4, 392, 518
    full = estimate_peak_memory(cfg, S, H, W, keep_all_layers=True)
    lean = estimate_peak_memory(cfg, S, H, W, keep_all_layers=False)
    tokens = cfg.patch_start_idx + (H // 14) * (W // 14)
    dropped = (cfg.depth - len(cfg.layers_read_by_heads())) * S * tokens * 2 * cfg.embed_dim * 4
    assert full.weight_bytes == lean.weight_bytes == 1_190_596_120 * 4
    assert abs((full.peak_bytes - lean.peak_bytes) - dropped) < 0.02 * dropped


def test_estimate_grows_with_frames_and_never_counts_attention_matrices() -> None:
    cfg = get_preset("vggt-1b")
    small = estimate_peak_memory(cfg, 2, 392, 518)
    big = estimate_peak_memory(cfg, 64, 392, 518)
    assert big.activation_peak_bytes > small.activation_peak_bytes
    # A materialised 64-frame global score matrix alone would be 16 heads x (64*1041)^2 x 4 B = 284 GB.
    assert big.activation_peak_bytes < 20e9
