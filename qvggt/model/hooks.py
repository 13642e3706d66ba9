"""``HookSet``: the handles of the forward hooks one recorder puts on a model, removed together. Shared by the
calibration statistics (``qvggt.calib.stats``), the quantizers' input recorders (``qvggt.quant.recorder``) and
reconstruction's block-input recorder (``qvggt.quant.reconstruct``)."""

from __future__ import annotations

from typing import Self

from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet"]


class HookSet:
    """Keeps hook handles (``_add_hook``); ``remove()`` takes them all off (idempotent), as does leaving a ``with``
    block. What a subclass recorded stays readable after removal."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def _add_hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    @property
    def attached(self) -> bool:
        """Whether any hook is still on."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
