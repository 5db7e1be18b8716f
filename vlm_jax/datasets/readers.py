"""Readers for the studies' real datasets, from a local copy in their published layouts.

  read_spair        SPair-71k: PairAnnotation/<split>/*.json (+ JPEGImages/<category>/...)
  read_cub          CUB-200-2011: images.txt, image_class_labels.txt, classes.txt,
                    train_test_split.txt, bounding_boxes.txt, parts/, attributes/
  read_blink_jsonl  BLINK-style multiple choice: one JSON object per line with the question,
                    the options, the answer and 1-4 image paths

Each returns plain dicts with absolute image paths (images are opened by the caller, lazily).
A missing file raises FileNotFoundError naming the file and the expected layout.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


# ---------------------------------------------------------------------------------------------
# SPair-71k (Min et al. 2019)


def read_spair(root: str, split: str = "test", categories: set[str] | None = None) -> Iterator[dict]:
    """Image pairs with corresponding keypoints.

    Yields {"id", "category", "source_image", "target_image", "source_keypoints" [[x, y]...],
    "target_keypoints", "keypoint_ids", "source_box" (x0, y0, x1, y1), "target_box",
    "viewpoint_variation", ...} for every pair annotation of `split` (trn, val or test).
    """
    pair_dir = _need(os.path.join(root, "PairAnnotation", split),
                     "SPair-71k keeps pair annotations in PairAnnotation/<trn|val|test>/<id>:<category>.json")
    for name in sorted(os.listdir(pair_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(pair_dir, name)) as f:
            ann = json.load(f)
        category = ann["category"]
        if categories and category not in categories:
            continue
        images = os.path.join(root, "JPEGImages", category)
        yield {
            "id": name[:-5],
            "category": category,
            "source_image": os.path.join(images, ann["src_imname"]),
            "target_image": os.path.join(images, ann["trg_imname"]),
            "source_keypoints": [list(map(float, p)) for p in ann["src_kps"]],
            "target_keypoints": [list(map(float, p)) for p in ann["trg_kps"]],
            "keypoint_ids": [int(i) for i in ann.get("kps_ids", range(len(ann["src_kps"])))],
            "source_box": tuple(float(v) for v in ann["src_bndbox"]),
            "target_box": tuple(float(v) for v in ann["trg_bndbox"]),
            "viewpoint_variation": ann.get("viewpoint_variation"),
            "scale_variation": ann.get("scale_variation"),
            "truncation": (ann.get("src_truncation"), ann.get("trg_truncation")),
            "occlusion": (ann.get("src_occlusion"), ann.get("trg_occlusion")),
        }


# ---------------------------------------------------------------------------------------------
# CUB-200-2011 (Wah et al. 2011)


def _table(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def _bird_family(class_name: str) -> str:
    """A coarse label from a CUB class name: its last word ('001.Black_footed_Albatross' ->
    'albatross'), the level above the species (study D's 'coarse')."""
    words = re.sub(r"^\d+\.", "", class_name).split("_")
    return words[-1].lower()


def read_cub(root: str, split: str | None = None, with_parts: bool = True, with_attributes: bool = False) -> list[dict]:
    """CUB-200-2011 images with labels at three levels (superordinate 'bird', coarse family,
    fine species), the bounding box, and optionally part locations and attribute names.

    root: the CUB_200_2011 folder. split: None, 'train' or 'test'.
    """
    layout = "CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, ...}"
    images = {i: p for i, p in _table(_need(os.path.join(root, "images.txt"), layout))}
    labels = {i: c for i, c in _table(_need(os.path.join(root, "image_class_labels.txt"), layout))}
    classes = {c: n for c, n in _table(_need(os.path.join(root, "classes.txt"), layout))}
    is_train = {i: t == "1" for i, t in _table(_need(os.path.join(root, "train_test_split.txt"), layout))}
    boxes = {}
    box_path = os.path.join(root, "bounding_boxes.txt")
    if os.path.exists(box_path):
        for i, x, y, w, h in _table(box_path):
            boxes[i] = (float(x), float(y), float(x) + float(w), float(y) + float(h))
    parts: dict[str, list] = {}
    if with_parts and os.path.exists(os.path.join(root, "parts", "part_locs.txt")):
        names = {}
        for row in _table(os.path.join(root, "parts", "parts.txt")):
            names[row[0]] = " ".join(row[1:])
        for i, part, x, y, visible in _table(os.path.join(root, "parts", "part_locs.txt")):
            if visible == "1":
                parts.setdefault(i, []).append({"part": names[part], "xy": (float(x), float(y))})
    attributes: dict[str, list] = {}
    if with_attributes and os.path.exists(os.path.join(root, "attributes", "image_attribute_labels.txt")):
        attr_file = os.path.join(root, "attributes", "attributes.txt")
        if not os.path.exists(attr_file):  # the 2011 release keeps it one level up
            attr_file = os.path.join(os.path.dirname(os.path.abspath(root)), "attributes.txt")
        attr_names = {row[0]: " ".join(row[1:]) for row in _table(_need(attr_file, "attributes.txt"))}
        for row in _table(os.path.join(root, "attributes", "image_attribute_labels.txt")):
            if row[2] == "1":
                attributes.setdefault(row[0], []).append(attr_names[row[1]])
    out = []
    for i, path in images.items():
        if split is not None and is_train[i] != (split == "train"):
            continue
        class_name = classes[labels[i]]
        species = re.sub(r"^\d+\.", "", class_name).replace("_", " ")
        out.append({
            "id": int(i), "image": os.path.join(root, "images", path), "class_id": int(labels[i]) - 1,
            "labels": {"superordinate": "bird", "coarse": _bird_family(class_name), "fine": species},
            "box": boxes.get(i), "parts": parts.get(i, []), "attributes": attributes.get(i, []),
            "split": "train" if is_train[i] else "test",
        })
    return out


# ---------------------------------------------------------------------------------------------
# BLINK-style multiple choice (Fu et al. 2024)


def _letter(answer: str, n_options: int) -> str:
    m = re.search(r"\(?([A-Z])\)?", answer.strip())
    if not m or ord(m.group(1)) - ord("A") >= n_options:
        raise ValueError(f"cannot read an option letter from answer {answer!r}")
    return m.group(1)


def read_blink_jsonl(path: str) -> list[dict]:
    """Multiple-choice items: {"id", "question", "options" [...], "answer" (letter), "images"
    [absolute paths], "task"}. Accepts the BLINK field names (image_1..image_4, choices,
    answer '(A)') and the plain ones (images, options, answer 'A')."""
    base = os.path.dirname(os.path.abspath(_need(path, "a JSONL file of multiple-choice items")))
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            images = row.get("images") or [row[k] for k in ("image_1", "image_2", "image_3", "image_4")
                                            if row.get(k)]
            options = row.get("options") or row.get("choices")
            if not images or not options or "answer" not in row:
                raise ValueError(f"{path}:{n}: an item needs images (or image_1...), options (or choices) and answer")
            items.append({
                "id": row.get("idx", row.get("id", str(n))), "question": row.get("prompt", row.get("question", "")),
                "options": list(options), "answer": _letter(str(row["answer"]), len(options)),
                "images": [p if os.path.isabs(p) else os.path.join(base, p) for p in images],
                "task": row.get("sub_task", row.get("task")),
            })
    return items
