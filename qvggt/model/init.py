"""Deterministic name-seeded weights: any tensor's values follow from its name and shape alone.

Used to test and benchmark full-size architectures without storing or downloading weights. The rule (shared
with the golden outputs of the published code, see tests/data_files):

    seed = first 8 hex digits of sha256(name), z = randn(shape) from torch.Generator seeded with it
    name ends with "gamma" (LayerScale)                  -> 0.1 + 0.02 z
    1-D tensor named "...weight" (norm scales)           -> 1 + 0.05 z
    2+-D tensor, name without "token" or "pos_embed"     -> z / sqrt(fan_in)
    anything else (biases, tokens, position embeddings)  -> 0.02 z
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def name_seeded_tensor(name: str, shape: Iterable[int]) -> Tensor:
    """The float32 tensor the rule assigns to ``name`` with ``shape``."""
    shape = tuple(int(d) for d in shape)
    gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("gamma"):
        return z.mul_(0.02).add_(0.1)
    if len(shape) == 1 and name.endswith("weight"):
        return z.mul_(0.05).add_(1.0)
    if len(shape) >= 2 and "token" not in name and "pos_embed" not in name:
        return z.div_(math.sqrt(math.prod(shape[1:])))
    return z.mul_(0.02)


def fill_name_seeded_(model: nn.Module) -> nn.Module:
    """Replace every parameter and persistent buffer of ``model`` (even on meta) by its name-seeded value, on CPU.

    On a meta-device model, peak memory is one copy of the weights.
    """
    state = {name: name_seeded_tensor(name, t.shape) for name, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model
