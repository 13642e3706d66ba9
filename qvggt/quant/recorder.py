"""``InputRecorder``: the forward-pre-hook scaffolding shared by the calibration statistics of SmoothQuant
(``ChannelAbsMax``) and GPTQ (``HessianRecorder``): attach to named modules, skip empty inputs, flatten each input
to [T, K] (T tokens: all leading dims), hand it to the subclass's ``_record``, remove the hooks (or use as a context
manager). Nothing here keeps an activation: subclasses fold each one into running statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import torch
from torch import Tensor, nn

from qvggt.model.hooks import HookSet

__all__ = ["InputRecorder"]


class InputRecorder(HookSet):
    """Base of running statistics of modules' first inputs (module docstring); subclasses define ``_record``."""

    def attach(self, modules: Mapping[str, nn.Module]) -> Self:
        """Start recording the inputs of ``modules`` (name -> module); returns self."""
        for name, module in modules.items():
            self._add_hook(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not isinstance(x, Tensor) or x.numel() == 0:  # nothing to learn from an empty batch
                return
            with torch.no_grad():
                self._record(name, x.detach().reshape(-1, x.shape[-1]))

        return hook

    def _record(self, name: str, x2d: Tensor) -> None:
        """Fold one input ``x2d`` [T, K] of module ``name`` into the statistics."""
        raise NotImplementedError
