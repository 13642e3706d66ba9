"""Undo for ``quantize_``: what a failed quantization must put back so the caller's model is as it was.

Methods change a model in two ways: they swap submodules (a float Linear for a ``QuantLinear``) and they change
float tensors in place before swapping (rotations folded into weights, smoothing folded into LayerNorm affines
and V rows). ``ModelSnapshot`` records the submodule tree of the whole model (references only: cheap) and copies,
on the CPU, the parameters and buffers of the modules a method says it changes in place
(``QuantizeHandler.modifies_in_place``); ``restore`` puts both back, so outputs are bit-identical to before.

The copies cost host memory for as long as ``quantize_`` runs: about the float weights of the planned layers and
their blocks (2.4 GB for vggt-1b's aggregator at float32), on the CPU even when the model is on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["ModelSnapshot", "enclosing_modules"]


class ModelSnapshot:
    """The submodule tree of ``model`` and CPU copies of the tensors of ``changed`` (and their submodules)."""

    def __init__(self, model: nn.Module, changed: Iterable[nn.Module] = ()) -> None:
        self._tree = [(m, dict(m._modules)) for m in model.modules()]
        self._tensors: list[tuple[dict[str, Tensor | None], str, Tensor, Tensor]] = []
        seen: set[int] = set()
        for top in changed:
            for m in top.modules():
                for slots in (m._parameters, m._buffers):
                    for name, t in slots.items():
                        if t is None or t.is_meta or id(t) in seen:  # a meta tensor holds nothing to restore
                            continue
                        seen.add(id(t))
                        self._tensors.append((slots, name, t, t.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every submodule back where it was and every copied tensor back to its value (same objects)."""
        for module, children in self._tree:
            module._modules.clear()
            module._modules.update(children)
        for slots, name, t, saved in self._tensors:
            slots[name] = t  # the original object, in case it was reassigned
            if t.shape == saved.shape and t.dtype == saved.dtype:
                t.copy_(saved)
            else:
                t.data = saved.to(t.device)

    def discard(self) -> None:
        """Free the copies (quantization succeeded)."""
        self._tree.clear()
        self._tensors.clear()


def enclosing_modules(model: nn.Module, names: Iterable[str], kind: type[nn.Module]) -> list[nn.Module]:
    """The distinct modules of type ``kind`` that contain a module of ``names`` (qualified names), in model order."""
    modules = dict(model.named_modules())
    picked: set[str] = set()
    for name in names:
        parts = name.split(".")
        picked.update(
            p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if isinstance(modules.get(p), kind)
        )
    return [m for n, m in modules.items() if n in picked]
