"""Prefect tasks of the qvggt pipeline: thin wrappers over ``qvggt`` functions (no logic of their own beyond
cache keys, retries and the paths they hand on). Results are artifact paths, never tensors or models."""
