"""Study B's relative-depth task: two marked points in a rendered scene with occlusion.

A ground plane recedes to a horizon; shapes stand on it at depths z in [1, 4]: an object's
on-screen size scales as 1 / z and its base sits lower on screen the nearer it is, and nearer
objects are drawn last (occluding farther ones). Point A is marked with a black dot, point B
with a white dot, each on a different object; the answer is the nearer one. The per-pixel
depth map (background: the ground's depth, the sky far) comes with it for dense heads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax.datasets.questions import MC_PREFIX, chat
from vlm_jax.datasets.shapes import COLORS, NAMED_SHAPES, Entity, entity_mask, _draw_entity

QUESTION = "point A is the black dot and point B is the white dot . which point is closer to the camera , A or B ?"
FAR = 10.0


def depth_item(rng, image_size: int = 64, prefix: str = MC_PREFIX) -> dict:
    horizon = image_size * 0.35
    img = Image.new("RGB", (image_size, image_size), (200, 225, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, horizon, image_size, image_size], fill=(205, 200, 185))
    ys = np.arange(image_size)[:, None] + 0.5
    depth = np.where(ys > horizon, np.clip((image_size - horizon) / np.maximum(ys - horizon, 1e-3), 1.0, FAR), FAR)
    depth = np.broadcast_to(depth, (image_size, image_size)).copy()
    n = int(rng.integers(2, 4))
    zs = np.sort(rng.uniform(1.0, 4.0, n))[::-1]  # far to near
    entities = []
    for z in zs:
        size = image_size * 0.28 / z
        base = horizon + (image_size - horizon) / z  # where the object touches the ground
        center = (float(rng.uniform(size, image_size - size)), float(base - size))
        entity = Entity(kind=str(rng.choice(NAMED_SHAPES)), color=str(rng.choice(list(COLORS))), center=center,
                        size=float(size), rotation=float(rng.uniform(0, 6.28)))
        _draw_entity(draw, entity, image_size)
        mask = entity_mask(entity, image_size)
        depth[mask] = z
        entities.append((entity, z))
    # pick two objects with a clear depth difference, and a visible pixel of each
    visible = [(depth == z) for _, z in entities]
    candidates = [i for i, v in enumerate(visible) if v.sum() >= 6]
    if len(candidates) < 2:
        return depth_item(rng, image_size, prefix)
    i, j = rng.choice(candidates, size=2, replace=False)
    if abs(entities[i][1] - entities[j][1]) < 0.3:
        return depth_item(rng, image_size, prefix)
    points = []
    for k, color in ((i, (0, 0, 0)), (j, (255, 255, 255))):
        yx = np.argwhere(visible[k])
        y, x = yx[int(rng.integers(len(yx)))]
        draw.ellipse([x - 1.6, y - 1.6, x + 1.6, y + 1.6], fill=color)
        points.append((float(x) + 0.5, float(y) + 0.5))
    closer = 0 if entities[i][1] < entities[j][1] else 1
    letter = "AB"[closer]
    return {"prompt": chat(QUESTION) + (" " + prefix if prefix else ""), "images": [img],
            "answer": letter if prefix else f" {letter}", "type": "depth", "label": letter, "closer": closer,
            "points": points, "depth": depth.astype(np.float32), "depths": [float(entities[i][1]), float(entities[j][1])]}
