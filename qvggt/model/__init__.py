"""The VGGT model: config, modules and checkpoint I/O."""

from qvggt.model.checkpoint import CheckpointError, build_model, load_vggt, save_checkpoint
from qvggt.model.config import PRESETS, VGGTConfig, get_preset
from qvggt.model.vggt import VGGT

__all__ = [
    "PRESETS",
    "VGGT",
    "CheckpointError",
    "VGGTConfig",
    "build_model",
    "get_preset",
    "load_vggt",
    "save_checkpoint",
]
