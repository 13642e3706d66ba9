"""Quantization core: number formats, quantize/dequantize primitives, observers and bit packing.

Layers, bottom up (each imports only the ones above it in this list):

- ``qvggt.quant.formats``: ``QuantFormat`` (int2..int8 symmetric/asymmetric, fp8 e4m3) x granularity
  (tensor, channel, token, group), with ``parse_format("int4-sym-group128")``.
- ``qvggt.quant.quantizer``: ``compute_scales``, ``quantize``, ``dequantize``, ``fake_quantize``,
  ``fake_quantize_ste`` (learnable clipping), ``mse_clip_search`` and ``MinMaxObserver`` (static scales).
- ``qvggt.quant.packing``: ``pack_int4``/``unpack_int4`` and general ``pack_bits``/``unpack_bits``.
- ``qvggt.quant.config``: ``QuantConfig`` (versioned, allow-listed ``to_dict``/``config_from_dict``), ``RTNConfig``,
  ``Coverage``, ``weight_activation_formats``.
- ``qvggt.quant.coverage``: ``select_linears`` (default: 192 aggregator-block Linears of vggt-1b; full) and
  ``plan_layers`` (filter, per-layer overrides, validation before any change).
- ``qvggt.quant.linear``: ``QuantLinear`` / ``QuantConv2d`` with stored codes (int4 packed) and a torch reference
  forward.
- ``qvggt.quant.api``: ``quantize_(model, config, filter_fn, calibration_data=...)``, the handler registry
  (``@register_quantize_handler``, prepare -> data -> convert) and ``quantization_summary``.
- ``qvggt.quant.rtn``: the RTN handler (registered on import; ``quantize_`` imports it on first use).

Everything is pure torch, runs on CPU and CUDA tensors alike, and initialises no CUDA at import.
This package ``__init__`` imports nothing, so ``import qvggt.quant`` stays free.
"""
