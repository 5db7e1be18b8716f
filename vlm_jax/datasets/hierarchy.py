"""Study D's fine-grained hierarchy: superordinate (family) > coarse (shape) > fine (variant).

  family    polygon {triangle, square, pentagon, hexagon}, round {circle}, spiky {star}
  shape     the six named shapes
  fine      "<variant> <shape>", variant in plain / striped / dotted / hollow (24 classes)

Each fine class has attribute text ("three corners covered in stripes"), so a model can be
asked for the fine name from the attributes alone (text-only) or from the image.
"""

from __future__ import annotations

from vlm_jax.datasets.questions import chat, single_shape
from vlm_jax.datasets.shapes import NAMED_SHAPES, VARIANTS

FAMILY = {"triangle": "polygon", "square": "polygon", "pentagon": "polygon", "hexagon": "polygon",
          "circle": "round", "star": "spiky"}
SHAPE_TEXT = {"triangle": "three corners", "square": "four equal sides", "pentagon": "five corners",
              "hexagon": "six corners", "circle": "no corners", "star": "five sharp points"}
VARIANT_TEXT = {"plain": "filled with one color", "striped": "covered in stripes", "dotted": "covered in dots",
                "hollow": "drawn as an outline only"}
LEVELS = ("superordinate", "coarse", "fine")
QUESTIONS = {"superordinate": "what family of shape is this ?", "coarse": "what shape is this ?",
             "fine": "what exact kind of shape is this ?"}
ATTRIBUTE_QUESTION = "what attributes do you see ?"
FINE_CLASSES = tuple(f"{v} {s}" for s in NAMED_SHAPES for v in VARIANTS)


def labels(shape: str, variant: str) -> dict[str, str]:
    return {"superordinate": FAMILY[shape], "coarse": shape, "fine": f"{variant} {shape}"}


def attributes(shape: str, variant: str) -> str:
    return f"{SHAPE_TEXT[shape]} {VARIANT_TEXT[variant]}"


def fine_item(rng, image_size: int = 64, shape: str | None = None, variant: str | None = None):
    """An image of one fine class with its labels at every level and its attribute text."""
    shape = shape or str(rng.choice(NAMED_SHAPES))
    variant = variant or str(rng.choice(VARIANTS))
    img, entity, box, mask = single_shape(rng, shape, image_size, variant=variant, size_range=(18, 24))
    return {"images": [img], "shape": shape, "variant": variant, "labels": labels(shape, variant),
            "attributes": attributes(shape, variant), "entities": [entity], "boxes": [box], "masks": [mask]}


def text_only_prompt(shape: str, variant: str) -> str:
    return chat(f"a shape with {attributes(shape, variant)} . {QUESTIONS['fine'].replace('this', 'it')}", 0)


TRAINING_KINDS = {"superordinate": 0.3, "attributes": 0.25, "text_fine": 0.35, "image_fine": 0.1}


def hierarchy_training_example(rng, image_size: int = 64, kind: str | None = None) -> dict:
    """One training example of the hierarchy. Drawn kinds follow the imbalance of web-scale VLM
    data: fine names are seen mostly in text (attributes -> name), rarely paired with an image."""
    item = fine_item(rng, image_size)
    if kind is None:
        kind = str(rng.choice(list(TRAINING_KINDS), p=list(TRAINING_KINDS.values())))
    shape, variant = item["shape"], item["variant"]
    if kind == "text_fine":
        return {"prompt": text_only_prompt(shape, variant), "images": [], "answer": f" a {variant} {shape}",
                "type": "text_fine", "label": f"{variant} {shape}"}
    if kind == "attributes":
        return {"prompt": chat(ATTRIBUTE_QUESTION), "images": item["images"], "answer": " " + item["attributes"],
                "type": "attributes", "label": item["attributes"]}
    level = "superordinate" if kind == "superordinate" else "fine"
    answer = item["labels"][level]
    return {"prompt": chat(QUESTIONS[level]), "images": item["images"], "answer": f" a {answer}",
            "type": level, "label": answer}


def fine_examples(rng, n: int, image_size: int = 64) -> list[dict]:
    return [fine_item(rng, image_size) for _ in range(n)]

