"""The training settings tests/train shares: a few real steps on the tiny preset (42 px, 2 frames, 3 scenes).

A module of its own, not conftest: ``from conftest import`` finds whichever conftest.py pytest imported first.
"""

from qvggt.config import TrainConfig

#: A few real training steps on the tiny preset (tests/train): 42 px, 2 frames, 3 scenes.
TINY_TRAIN = TrainConfig(
    preset="tiny",
    steps=4,
    batch_size=2,
    num_frames=2,
    image_size=42,
    num_scenes=3,
    warmup_steps=1,
    checkpoint_every=2,
    log_every=1,
    lr=1e-3,
    threads=1,
)
