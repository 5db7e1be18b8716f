"""Study A's shape world: six named shapes and random squiggles, rendered with PIL.

Everything is deterministic from seeds: a squiggle's identity is its integer id (its outline
is a smooth random closed curve drawn from that id), and a scene is fully described by a
list of `Entity` records, so boxes and masks are exact.

  NAMED_SHAPES   circle, hexagon, pentagon, square, star, triangle
  COLORS         name -> RGB
  render_scene   entities -> (PIL image, per-entity boxes and masks)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

NAMED_SHAPES = ("circle", "hexagon", "pentagon", "square", "star", "triangle")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
BACKGROUND = (245, 245, 245)
# Shapes are drawn upright and centred on a grid of image_size / GRID_CELLS pixels (the toy's
# 8-px patches at 64 px): a small ViT trained from scratch in CPU-minutes learns shapes that
# line up with its patches, but not rotation or sub-patch translation invariance (measured:
# a 4-layer tower reaches 0.95 name accuracy on upright, grid-aligned shapes in 1600 steps and
# stays at 0.35 on freely rotated, freely placed ones).
GRID_CELLS = 8
VARIANTS = ("plain", "striped", "dotted", "hollow")  # fill patterns (study D's fine level)


@dataclass
class Entity:
    """One object in a scene: a named shape or squiggle <id>, where and how it is drawn."""

    kind: str  # a NAMED_SHAPES entry or "squiggle"
    color: str
    center: tuple[float, float]  # pixels
    size: float  # radius in pixels
    rotation: float = 0.0  # radians
    squiggle_id: int = 0
    variant: str = "plain"
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kind if self.kind != "squiggle" else f"squiggle-{self.squiggle_id}"


def _regular_polygon(n: int, rotation: float) -> np.ndarray:
    angles = rotation - math.pi / 2 + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(rotation: float, inner: float = 0.45) -> np.ndarray:
    angles = rotation - math.pi / 2 + np.arange(10) * math.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def squiggle_outline(squiggle_id: int, points: int = 72) -> np.ndarray:
    """The unit-scale outline of squiggle `squiggle_id`: a smooth random closed curve."""
    rng = np.random.default_rng(10_000 + squiggle_id)
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 7):  # a few random harmonics: blobby, irregular, clearly not a named shape
        radius += rng.uniform(0.08, 0.3) / k**0.3 * np.sin(k * t + rng.uniform(0, 2 * math.pi))
    radius = 0.35 + 0.65 * (radius - radius.min()) / (radius.max() - radius.min())
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def outline(entity: Entity) -> np.ndarray:
    """The entity's outline in unit scale, rotated (centre 0, radius ~1)."""
    if entity.kind == "circle":
        return _regular_polygon(64, 0.0)
    if entity.kind == "square":
        return _regular_polygon(4, entity.rotation + math.pi / 4) * 0.95
    if entity.kind == "triangle":
        return _regular_polygon(3, entity.rotation)
    if entity.kind == "pentagon":
        return _regular_polygon(5, entity.rotation)
    if entity.kind == "hexagon":
        return _regular_polygon(6, entity.rotation)
    if entity.kind == "star":
        return _star(entity.rotation)
    if entity.kind == "squiggle":
        pts = squiggle_outline(entity.squiggle_id)
        c, s = math.cos(entity.rotation), math.sin(entity.rotation)
        return pts @ np.array([[c, s], [-s, c]])
    raise ValueError(f"unknown shape kind {entity.kind!r}")


def _polygon(entity: Entity) -> list[tuple[float, float]]:
    pts = outline(entity) * entity.size + np.asarray(entity.center)
    return [tuple(p) for p in pts]


def _draw_entity(draw: ImageDraw.ImageDraw, entity: Entity, image_size: int) -> None:
    rgb = COLORS[entity.color]
    poly = _polygon(entity)
    if entity.variant == "hollow":
        draw.polygon(poly, outline=rgb, width=max(1, int(entity.size / 5)))
        return
    draw.polygon(poly, fill=rgb)
    if entity.variant in ("striped", "dotted"):
        # pattern inside the shape: white stripes or dots, clipped to the shape by a mask
        pattern = Image.new("L", (image_size, image_size), 0)
        pd = ImageDraw.Draw(pattern)
        cx, cy = entity.center
        r = entity.size
        step = max(3, int(r / 2.5))
        if entity.variant == "striped":
            for y in range(int(cy - r), int(cy + r) + 1, step):
                pd.line([(cx - r, y), (cx + r, y)], fill=255, width=max(1, step // 3))
        else:
            for y in range(int(cy - r), int(cy + r) + 1, step):
                for x in range(int(cx - r), int(cx + r) + 1, step):
                    pd.ellipse([x - step / 5, y - step / 5, x + step / 5, y + step / 5], fill=255)
        shape_mask = Image.new("L", (image_size, image_size), 0)
        ImageDraw.Draw(shape_mask).polygon(poly, fill=255)
        pattern = Image.fromarray((np.asarray(pattern) & np.asarray(shape_mask)).astype(np.uint8))
        draw.bitmap((0, 0), pattern, fill=(255, 255, 255))


def entity_mask(entity: Entity, image_size: int) -> np.ndarray:
    """bool [H, W]: the pixels the entity covers (alone, before occlusion)."""
    mask = Image.new("L", (image_size, image_size), 0)
    ImageDraw.Draw(mask).polygon(_polygon(entity), fill=255)
    return np.asarray(mask) > 0


def render_scene(entities: list[Entity], image_size: int = 64, background=BACKGROUND):
    """(PIL image, boxes [n, 4] (x0, y0, x1, y1), visible masks [n, H, W]); later entities
    are drawn on top of (and occlude) earlier ones."""
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    masks = []
    for entity in entities:
        _draw_entity(draw, entity, image_size)
        masks.append(entity_mask(entity, image_size))
    visible = []
    for i, mask in enumerate(masks):
        covered = np.zeros_like(mask)
        for later in masks[i + 1:]:
            covered |= later
        visible.append(mask & ~covered)
    boxes = []
    for mask in visible:
        ys, xs = np.nonzero(mask)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0))
    return img, np.array(boxes, np.float32).reshape(-1, 4), np.array(visible).reshape(-1, image_size, image_size)


def snap(value: float, image_size: int) -> float:
    """The nearest point of the placement grid (multiples of image_size / GRID_CELLS)."""
    cell = image_size / GRID_CELLS
    return float(round(value / cell) * cell)


def place(rng: np.random.Generator, sizes: list[float], image_size: int, margin: float = 2.0,
          tries: int = 200) -> list[tuple[float, float]] | None:
    """Non-overlapping grid-point centres for discs of the given radii (None if they do not fit)."""
    centers: list[tuple[float, float]] = []
    cell = image_size / GRID_CELLS
    for r in sizes:
        low, high = math.ceil((r + margin) / cell), math.floor((image_size - r - margin) / cell)
        if low > high:
            return None
        for _ in range(tries):
            c = (float(rng.integers(low, high + 1) * cell), float(rng.integers(low, high + 1) * cell))
            if all(math.dist(c, o) > r + ro + margin for o, ro in zip(centers, sizes)):
                centers.append(c)
                break
        else:
            return None
    return centers


def random_entity(rng: np.random.Generator, kind: str, *, center=(0.0, 0.0), size=10.0, squiggle_id: int = 0,
                  color: str | None = None, variant: str = "plain") -> Entity:
    return Entity(kind=kind, color=color or str(rng.choice(list(COLORS))), center=center, size=size,
                  rotation=0.0,
                  squiggle_id=squiggle_id, variant=variant)
