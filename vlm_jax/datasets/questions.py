"""Captions and questions about shape scenes (b), and study A's two-image correspondence items (a).

Every generator takes a numpy Generator and returns examples in the trainer's format
    {"prompt": "USER: <image>\\n... ASSISTANT:", "images": [PIL...], "answer": " ...", ...}
plus the metadata analyses need (entities, boxes, masks, correct letter...). Prompts use the
toy model's chat format; `question_text` gives the bare question for other templates.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.datasets.shapes import COLORS, NAMED_SHAPES, place, random_entity, render_scene, snap

LETTERS = ("A", "B", "C", "D")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MC_PREFIX = "The correct option is ("


def chat(question: str, n_images: int = 1) -> str:
    """The toy's chat template: USER: <image>\\n... question ASSISTANT:"""
    return "USER: " + "<image>\n" * n_images + question + " ASSISTANT:"


def position_word(center: tuple[float, float], image_size: int) -> str:
    dx, dy = center[0] - image_size / 2, center[1] - image_size / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def single_shape(rng, kind: str, image_size: int = 64, squiggle_id: int = 0, color: str | None = None,
                 variant: str = "plain", size_range=(16, 20)):
    """One entity near the centre (on the placement grid): (image, entity, box, mask)."""
    size = float(rng.uniform(*size_range))
    jitter = image_size * 0.12
    center = (snap(image_size / 2 + rng.uniform(-jitter, jitter), image_size),
              snap(image_size / 2 + rng.uniform(-jitter, jitter), image_size))
    entity = random_entity(rng, kind, center=center, size=size, squiggle_id=squiggle_id, color=color, variant=variant)
    img, boxes, masks = render_scene([entity], image_size)
    return img, entity, boxes[0], masks[0]


def scene(rng, kinds: list[tuple[str, int]], image_size: int = 64, size_range=(11, 14)):
    """Several entities placed without overlap: (image, entities, boxes, masks) or None."""
    sizes = [float(rng.uniform(*size_range)) for _ in kinds]
    centers = place(rng, sizes, image_size)
    if centers is None:
        return None
    colors = rng.choice(list(COLORS), size=len(kinds), replace=len(kinds) > len(COLORS))
    entities = [random_entity(rng, kind, center=c, size=s, squiggle_id=sid, color=str(col))
                for (kind, sid), c, s, col in zip(kinds, centers, sizes, colors)]
    img, boxes, masks = render_scene(entities, image_size)
    return img, entities, boxes, masks


# ---------------------------------------------------------------------------------------------
# (b) captions and questions


def name_question(rng, image_size=64):
    kind = str(rng.choice(NAMED_SHAPES))
    img, entity, box, mask = single_shape(rng, kind, image_size)
    return {"prompt": chat("what shape is this ?"), "images": [img], "answer": f" a {kind}", "type": "name",
            "label": kind, "entities": [entity], "boxes": [box], "masks": [mask]}


def color_question(rng, image_size=64, two_shapes: bool | None = None):
    """"what color is the <shape> ?" about a lone shape or one of two (chosen at random unless
    two_shapes says which)."""
    if (rng.random() < 0.5) if two_shapes is None else not two_shapes:  # one shape: no name needed
        kind = str(rng.choice(NAMED_SHAPES))
        img, entity, box, mask = single_shape(rng, kind, image_size)
        return {"prompt": chat("what color is the shape ?"), "images": [img], "answer": f" {entity.color}",
                "type": "color", "label": entity.color, "entities": [entity], "boxes": [box], "masks": [mask]}
    while True:
        kinds = rng.choice(NAMED_SHAPES, size=2, replace=False)
        made = scene(rng, [(str(k), 0) for k in kinds], image_size)
        if made is not None:
            break
    img, entities, boxes, masks = made
    target = int(rng.integers(2))
    return {"prompt": chat(f"what color is the {entities[target].kind} ?"), "images": [img],
            "answer": f" {entities[target].color}", "type": "color", "label": entities[target].color,
            "entities": entities, "boxes": list(boxes), "masks": list(masks)}


def position_question(rng, image_size=64):
    while True:
        kinds = rng.choice(NAMED_SHAPES, size=2, replace=False)
        made = scene(rng, [(str(k), 0) for k in kinds], image_size)
        if made is None:
            continue
        img, entities, boxes, masks = made
        target = int(rng.integers(2))
        c = entities[target].center
        if max(abs(c[0] - image_size / 2), abs(c[1] - image_size / 2)) > image_size * 0.15:
            break
    word = position_word(entities[target].center, image_size)
    return {"prompt": chat(f"where is the {entities[target].kind} ?"), "images": [img], "answer": f" {word}",
            "type": "position", "label": word, "entities": entities, "boxes": list(boxes), "masks": list(masks)}


def count_question(rng, image_size=64, n_squiggles: int = 40):
    while True:
        n = int(rng.integers(1, 4))
        kinds = [(str(rng.choice(NAMED_SHAPES)), 0) if rng.random() < 0.7 else ("squiggle", int(rng.integers(n_squiggles)))
                 for _ in range(n)]
        made = scene(rng, kinds, image_size)
        if made is not None:
            break
    img, entities, boxes, masks = made
    return {"prompt": chat("how many shapes are there ?"), "images": [img], "answer": f" {NUMBER_WORDS[n]}",
            "type": "count", "label": NUMBER_WORDS[n], "entities": entities, "boxes": list(boxes), "masks": list(masks)}


def caption(rng, image_size=64):
    while True:
        n = int(rng.integers(1, 3))
        kinds = rng.choice(NAMED_SHAPES, size=n, replace=False)
        made = scene(rng, [(str(k), 0) for k in kinds], image_size)
        if made is not None:
            break
    img, entities, boxes, masks = made
    text = " and ".join(f"a {e.color} {e.kind}" for e in sorted(entities, key=lambda e: e.center[0]))
    return {"prompt": chat("describe the image ."), "images": [img], "answer": " " + text, "type": "caption",
            "label": text, "entities": entities, "boxes": list(boxes), "masks": list(masks)}


QUESTION_TYPES = {"name": name_question, "color": color_question, "position": position_question,
                  "count": count_question, "caption": caption}


# ---------------------------------------------------------------------------------------------
# (a) study A: correspondence across two images


def correspondence_question() -> str:
    return ("image 1 shows one shape . image 2 shows four options : A top left , B top right , C bottom left , "
            "D bottom right . which option has the same shape as image 1 ?")


def correspondence_item(rng, family: str, image_size: int = 64, squiggle_pool: tuple[int, ...] = tuple(range(40)),
                        prefix: str = MC_PREFIX):
    """A REF image and a 2x2 option image; family 'named' or 'squiggle'.

    The REF and its match share the shape (not colour or size); the three
    distractors are other shapes of the same family. Returns the example with the correct
    letter, option boxes / masks in image 2, and the REF box / mask in image 1.
    """
    if family == "named":
        kinds = [(str(k), 0) for k in rng.choice(NAMED_SHAPES, size=4, replace=False)]
    elif family == "squiggle":
        kinds = [("squiggle", int(s)) for s in rng.choice(squiggle_pool, size=4, replace=False)]
    else:
        raise ValueError(f"family must be 'named' or 'squiggle', not {family!r}")
    ref_kind, ref_id = kinds[0]
    ref_img, ref_entity, ref_box, ref_mask = single_shape(rng, ref_kind, image_size, squiggle_id=ref_id)
    order = rng.permutation(4)  # option slot -> which of kinds
    correct = int(np.nonzero(order == 0)[0][0])
    half = image_size / 2
    entities = []
    for slot, which in enumerate(order):
        kind, sid = kinds[which]
        center = (snap(half * (slot % 2) + half / 2, image_size), snap(half * (slot // 2) + half / 2, image_size))
        entities.append(random_entity(rng, kind, center=center, size=float(rng.uniform(9, 12)), squiggle_id=sid))
    options_img, boxes, masks = render_scene(entities, image_size)
    return {
        "prompt": chat(correspondence_question(), 2) + (" " + prefix if prefix else ""),
        "images": [ref_img, options_img], "answer": " " + LETTERS[correct] if not prefix else LETTERS[correct],
        "type": "correspondence", "family": family, "label": LETTERS[correct], "correct": correct,
        "ref_entity": ref_entity, "ref_box": ref_box, "ref_mask": ref_mask,
        "entities": entities, "boxes": list(boxes), "masks": list(masks),
    }


# ---------------------------------------------------------------------------------------------
# the toy model's training mixture


def training_mixture(rng, n: int, image_size: int = 64, weights: dict | None = None) -> list[dict]:
    """n examples of the (b) question types (named shapes only; squiggles appear only as
    unnamed objects to count) plus named-shape correspondence items in study A's format."""
    from vlm_jax.datasets.hierarchy import hierarchy_training_example

    weights = weights or {"name": 3, "color": 3, "position": 2, "count": 2, "caption": 1, "correspondence": 3,
                          "hierarchy": 3}
    kinds = list(weights)
    p = np.asarray([weights[k] for k in kinds], float)
    p /= p.sum()
    out = []
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        if kind == "correspondence":
            item = correspondence_item(rng, "named", image_size, prefix="")
            item["answer"] = " " + MC_PREFIX + " " + item["label"] + " )"  # trained with the prefix
            out.append(item)
        elif kind == "hierarchy":
            out.append(hierarchy_training_example(rng, image_size))
        else:
            out.append(QUESTION_TYPES[kind](rng, image_size))
    return out


def words_in(examples) -> set[str]:
    """Every whitespace/punctuation-separated word of the examples' text (for the tokenizer)."""
    import re

    words: set[str] = set()
    for ex in examples:
        words.update(re.findall(r"[A-Za-z0-9_\-]+|[^\sA-Za-z0-9_\-]", ex["prompt"] + " " + ex.get("answer", "")))
    return words

