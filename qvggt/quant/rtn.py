"""RTN: round-to-nearest weight quantization, dynamic activation quantization, no calibration data.

``quantize_(model, RTNConfig(...))`` plans the layers (coverage, ``filter_fn``, ``layer_overrides``; everything is
validated before the first module is swapped), then replaces each selected ``nn.Linear`` by
``QuantLinear.from_float`` (weight RTN, optional min-MSE clipping, the config's dynamic activation format) and each
selected conv (``coverage="full"``) by a weight-only, per-output-channel ``QuantConv2d``.

What was quantized: ``qvggt.quant.api.quantization_summary(model)`` (layers, formats, weight bytes before/after);
it reads the modules, so it is also right for a model loaded from a quantized checkpoint.

Example::

    from qvggt.quant.api import quantize_, quantization_summary
    from qvggt.quant.config import RTNConfig, weight_activation_formats

    w, a = weight_activation_formats(4, 8, group_size=128)
    quantize_(model, RTNConfig(weight=w, activation=a))
    print(quantization_summary(model))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qvggt.quant.api import QuantizeHandler, register_quantize_handler
from qvggt.quant.config import QuantConfig, RTNConfig
from qvggt.quant.coverage import FilterFn, LayerPlan, plan_layers, replace_module
from qvggt.quant.linear import QuantConv2d, QuantLinear
from qvggt.quant.quantizer import mse_clip_search

__all__ = ["RTNHandler", "quantize_module"]


def quantize_module(plan: LayerPlan, clip_search: bool = False) -> nn.Module:
    """The quantized replacement of ``plan.module`` (left unmodified) for its planned formats.

    With ``clip_search`` every weight scale group gets the clipping ratio that minimises its squared error
    (``mse_clip_search``, 100 ratios in [0.5, 1]; ratio 1 is a candidate, so never worse than min/max).
    """
    module, fmt = plan.module, plan.weight
    ratio = None
    if clip_search:
        w = module.weight.detach()
        if plan.is_conv:  # the per-output-channel 2-D view QuantConv2d quantizes
            w = (w.transpose(0, 1) if isinstance(module, nn.ConvTranspose2d) else w).flatten(1)
        ratio = mse_clip_search(w, fmt)
    if plan.is_conv:
        return QuantConv2d.from_float(module, fmt, clip_ratio=ratio)  # type: ignore[arg-type]
    return QuantLinear.from_float(module, fmt, plan.activation, clip_ratio=ratio)  # type: ignore[arg-type]


@register_quantize_handler(RTNConfig)
class RTNHandler(QuantizeHandler):
    """Data-free: ``prepare`` does nothing, ``convert`` swaps the planned modules."""

    needs_calibration = False

    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        assert isinstance(config, RTNConfig)
        plans = plan_layers(model, config.coverage, config.weight, config.activation, config.layer_overrides, filter_fn)
        for name, plan in plans.items():
            replace_module(model, name, quantize_module(plan, config.clip_search))
        return model
