"""A small synthetic finetuning task shared by the training tests: name the colour of a square."""

from __future__ import annotations

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
PROMPT = "USER: <image>\nwhat color is this ? ASSISTANT:"


def examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name = list(COLORS)[rng.integers(3)]
        rgb = np.clip(np.array(COLORS[name]) + rng.integers(-25, 25, 3), 0, 255)
        img = Image.new("RGB", (56, 56), tuple(int(c) for c in rgb))
        out.append({"prompt": PROMPT, "images": [img], "answer": " " + name})
    return out


CONFIG_TEMPLATE = """
import sys
sys.path.insert(0, {tests!r})
from train_task import examples
from vlm_jax.train import TrainConfig, LoraConfig

def config():
    return TrainConfig(model={model!r}, train_data=lambda: examples(48, 0), output_dir={out!r},
                       param_dtype="float32", learning_rate=3e-3, batch_size=8, max_steps={steps},
                       checkpoint_every={every}, keep_checkpoints=3, remat=False, progress=False, **{extra})
"""
