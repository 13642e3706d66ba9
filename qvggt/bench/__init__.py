"""``qvggt bench``: kernel and end-to-end speed, memory and fidelity of the published path vs the engine configs."""
