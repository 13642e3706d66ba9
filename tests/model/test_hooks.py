"""HookSet: every hook a recorder registered comes off together, once or twice, or on leaving a with block."""

from __future__ import annotations

import torch

from qvggt.model.hooks import HookSet


class _Counter(HookSet):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.calls = 0
        self._add_hook(module.register_forward_pre_hook(self._count))
        self._add_hook(module.register_forward_hook(self._count))

    def _count(self, *args: object) -> None:
        self.calls += 1


def test_hooks_fire_until_removed_and_removal_is_idempotent() -> None:
    lin = torch.nn.Linear(2, 2)
    with _Counter(lin) as counter:
        lin(torch.ones(1, 2))
        assert counter.calls == 2 and counter.attached
    lin(torch.ones(1, 2))
    assert counter.calls == 2 and not counter.attached
    counter.remove()  # a second removal is a no-op
    assert not lin._forward_pre_hooks and not lin._forward_hooks
