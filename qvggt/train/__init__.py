"""Training VGGT presets on synthetic scenes."""
