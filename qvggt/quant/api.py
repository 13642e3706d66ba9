"""The one quantization verb, ``quantize_(model, config)``, its handler registry, and ``quantization_summary``.

A method is a config class (``qvggt.quant.config.QuantConfig`` subclass) plus a handler registered for it::

    @register_quantize_handler(MyConfig)
    class MyHandler(QuantizeHandler):
        needs_calibration = True
        def prepare(self, model, config, filter_fn=None):   # add observers / hooks, return their state
            ...
        def convert(self, model, config, state, filter_fn=None):   # fold statistics, swap modules
            ...
        def release(self, model, state):   # always called at the end: remove hooks (also after an error)
            ...
        def modifies_in_place(self, model, config, filter_fn=None):   # modules whose tensors prepare/convert change
            ...

``quantize_`` dispatches on ``type(config)`` (exact type) and runs prepare -> calibration batches -> convert.
Nothing here knows any method: a new method never edits this file. A config whose handler is not registered yet
is looked up once more after importing its ``HANDLER_MODULE`` (so ``quantize_(m, RTNConfig())`` works without
importing ``qvggt.quant.rtn`` first); error messages list the handlers of every method module of
``qvggt.quant.config.ALLOWED_CONFIG_MODULES`` that exists.

Calibration batches go through the model under ``torch.no_grad()`` in eval mode (the training flag is restored
afterwards): a Tensor as ``model(batch)``, a Mapping as ``model(**batch)``, a tuple/list as ``model(*batch)``.
Observers must keep running statistics (``MinMaxObserver``), never the activations.

A failed ``quantize_`` (an exception in prepare, calibration or convert) leaves the model as it was: submodule
swaps are undone, and the tensors of the modules ``modifies_in_place`` names (rotations, folds) are restored from
copies taken before prepare (``qvggt.quant.snapshot``).
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from qvggt.quant.config import ALLOWED_CONFIG_MODULES, QuantConfig
from qvggt.quant.coverage import FilterFn
from qvggt.quant.linear import QuantConv2d, QuantLinear
from qvggt.quant.snapshot import ModelSnapshot

__all__ = [
    "QuantSummary",
    "QuantizeHandler",
    "get_quantize_handler",
    "needs_calibration",
    "quantization_summary",
    "quantize_",
    "register_quantize_handler",
    "registered_configs",
]


class QuantizeHandler(ABC):
    """Protocol of a quantization method; one instance per registered config class (keep it stateless).

    ``needs_calibration`` says whether ``quantize_`` requires ``calibration_data``. ``prepare`` returns whatever
    ``convert`` needs (observers, hook handles); ``release`` undoes ``prepare``'s side effects and runs after
    ``convert`` and after any error, so a failed calibration never leaves hooks on the model.
    """

    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> Any:
        """Instrument ``model`` before calibration data runs; returns the state handed to ``convert``."""
        return None

    @abstractmethod
    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        """Quantize ``model`` in place (swap modules, fold statistics) and return it."""

    def release(self, model: nn.Module, state: Any) -> None:
        """Remove whatever ``prepare`` attached (hooks); called once at the end, also on errors."""

    def modifies_in_place(
        self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
    ) -> Iterable[nn.Module]:
        """Modules whose parameters or buffers ``prepare`` / ``convert`` change in place (rotations and folds into
        float weights): ``quantize_`` copies them first and restores them if quantization fails. Swapped
        submodules need no listing (the module tree is always restored). Default: none."""
        return ()


_HANDLERS: dict[type[QuantConfig], QuantizeHandler] = {}

H = TypeVar("H", bound=type[QuantizeHandler])


def register_quantize_handler(config_cls: type[QuantConfig]) -> Any:
    """Class decorator: register a ``QuantizeHandler`` subclass (instantiated once, no arguments) for
    ``config_cls``.

    Re-registering the same handler class (a module reload) replaces it; a *different* handler for an already
    registered config raises ValueError.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantConfig)):
        raise TypeError(f"register_quantize_handler expects a QuantConfig subclass, got {config_cls!r}")

    def decorator(handler_cls: H) -> H:
        if not (isinstance(handler_cls, type) and issubclass(handler_cls, QuantizeHandler)):
            raise TypeError(f"@register_quantize_handler decorates QuantizeHandler subclasses, got {handler_cls!r}")
        old = _HANDLERS.get(config_cls)
        if old is not None and type(old).__qualname__ != handler_cls.__qualname__:
            raise ValueError(
                f"{config_cls.__name__} already has handler {type(old).__qualname__}; refusing {handler_cls.__qualname__}"
            )
        _HANDLERS[config_cls] = handler_cls()
        return handler_cls

    return decorator


def _import_method_modules() -> None:
    """Import the method modules of the allow-list that exist (their import registers their handlers).

    Best effort, for listings only: a module that fails to import is skipped here and raises where it is used.
    """
    for mod_name in ALLOWED_CONFIG_MODULES:
        if mod_name in (__name__, QuantConfig.__module__):
            continue
        try:
            if importlib.util.find_spec(mod_name) is not None:
                importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001, S112 - a half-written sibling module must not hide the real error
            continue


def registered_configs() -> list[str]:
    """Names of the config classes that have a handler, sorted (built-in methods included even if not imported)."""
    _import_method_modules()
    return sorted(c.__name__ for c in _HANDLERS)


def get_quantize_handler(config: QuantConfig) -> QuantizeHandler:
    """The handler for ``type(config)``, importing its ``HANDLER_MODULE`` on first use.

    Raises:
        TypeError: ``config`` is not a QuantConfig.
        ValueError: no handler is registered for its type (the message lists the registered ones).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"quantize_ expects a QuantConfig instance (e.g. RTNConfig()), got {type(config).__name__}; "
            f"registered configs: {registered_configs()}"
        )
    cls = type(config)
    if cls not in _HANDLERS and cls.HANDLER_MODULE is not None:
        importlib.import_module(cls.HANDLER_MODULE)
    handler = _HANDLERS.get(cls)
    if handler is None:
        raise ValueError(
            f"no quantize handler registered for {cls.__name__}; registered configs: {registered_configs()} "
            "(decorate a QuantizeHandler with @register_quantize_handler(YourConfig))"
        )
    return handler


def needs_calibration(config: QuantConfig) -> bool:
    """Whether ``quantize_(model, config)`` needs ``calibration_data`` (for generic pipelines)."""
    return get_quantize_handler(config).needs_calibration


def _feed(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(f"calibration batches must be a Tensor, a Mapping or a tuple/list, got {type(batch).__name__}")


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: FilterFn | None = None,
    *,
    calibration_data: Iterable[Any] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place with the method ``config`` names and return it.

    Runs ``handler.prepare`` -> each calibration batch through ``model`` (no_grad, eval mode) -> ``handler.convert``
    -> ``handler.release`` (the last also on errors).

    Args:
        model: the float model (e.g. a VGGT); modified in place.
        config: a registered QuantConfig (``RTNConfig(...)``, ...).
        filter_fn: ``filter_fn(module, name) -> bool``, restricting the config's coverage further.
        calibration_data: iterable of batches; required iff the handler ``needs_calibration``.

    Returns:
        ``model`` itself. See ``quantization_summary(model)`` for what was quantized.

    Raises:
        TypeError / ValueError: unregistered config (listing the registered ones), calibration data missing,
            empty or given to a method that takes none, or whatever the handler raises for an invalid config.
            After any error ``model`` is as it was before the call (module docstring).
    """
    handler = get_quantize_handler(config)
    name = type(config).__name__
    if handler.needs_calibration and calibration_data is None:
        raise ValueError(f"{name} needs calibration data: pass calibration_data=<iterable of model inputs>")
    if not handler.needs_calibration and calibration_data is not None:
        # Silently ignoring it would let a caller believe the model was calibrated.
        raise ValueError(f"{name} takes no calibration data (data-free); drop calibration_data")
    snapshot = ModelSnapshot(model, handler.modifies_in_place(model, config, filter_fn))
    try:
        state = handler.prepare(model, config, filter_fn)
        try:
            if calibration_data is not None:
                was_training = model.training
                model.eval()
                try:
                    n = 0
                    with torch.no_grad():
                        for batch in calibration_data:
                            _feed(model, batch)
                            n += 1
                finally:
                    model.train(was_training)
                if n == 0:
                    raise ValueError(f"{name}: calibration_data yielded no batch")
            return handler.convert(model, config, state, filter_fn)
        finally:
            handler.release(model, state)
    except BaseException:
        snapshot.restore()  # rotated / folded weights and swapped modules back: the caller's model is unchanged
        raise
    finally:
        snapshot.discard()


@dataclass(frozen=True)
class QuantSummary:
    """What a model's quantized modules hold (derived from the modules, so it also holds after loading).

    Attributes:
        num_layers: quantized modules (``QuantLinear`` + ``QuantConv2d``).
        num_linear, num_conv: of which Linears / convs.
        weight_formats: weight format name -> number of layers.
        activation_formats: activation format name (``"none"`` for weight-only) -> number of layers.
        weight_numel: quantized weight elements.
        weight_bytes_before: those weights' bytes in their original float dtype.
        weight_bytes_after: bytes of codes (packed where <= 4 bits) + scales + zero points. Biases (kept float)
            count in neither.
    """

    num_layers: int
    num_linear: int
    num_conv: int
    weight_formats: dict[str, int] = field(default_factory=dict)
    activation_formats: dict[str, int] = field(default_factory=dict)
    weight_numel: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    @property
    def compression(self) -> float:
        """weight_bytes_before / weight_bytes_after (0 when nothing is quantized)."""
        return self.weight_bytes_before / self.weight_bytes_after if self.weight_bytes_after else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per quantized weight element, scales and zero points included."""
        return 8.0 * self.weight_bytes_after / self.weight_numel if self.weight_numel else 0.0


def quantization_summary(model: nn.Module) -> QuantSummary:
    """Count the quantized modules of ``model`` and their weight bytes before/after quantization."""
    mods = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    wf = Counter(m.weight_fmt.name for m in mods)
    af = Counter(m.act_fmt.name if m.act_fmt is not None else "none" for m in mods)
    return QuantSummary(
        num_layers=len(mods),
        num_linear=sum(isinstance(m, QuantLinear) for m in mods),
        num_conv=sum(isinstance(m, QuantConv2d) for m in mods),
        weight_formats=dict(sorted(wf.items())),
        activation_formats=dict(sorted(af.items())),
        weight_numel=sum(m.weight_numel for m in mods),
        weight_bytes_before=sum(m.float_weight_nbytes for m in mods),
        weight_bytes_after=sum(m.weight_nbytes for m in mods),
    )
