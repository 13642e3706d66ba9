"""Evaluation: metrics and protocols for comparing quantized and full-precision VGGT reconstructions."""
