"""Camera geometry: rotations, pose encodings, projections."""
