"""Tiny copies of the studies' real datasets in their published layouts (SPair-71k, CUB-200-2011,
BLINK jsonl), with synthetic images, for the readers and the experiments' real-data paths."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def _image(path, size, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize(size, Image.NEAREST).save(path)


def write_spair(root: str, pairs: int = 3, keypoints: int = 5) -> str:
    """SPair-71k/{JPEGImages/<cat>/*.jpg, PairAnnotation/test/<id>:<cat>.json}."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "PairAnnotation", "test"), exist_ok=True)
    for category in ("cat", "car"):
        os.makedirs(os.path.join(root, "JPEGImages", category), exist_ok=True)
    for i in range(pairs):
        category = ("cat", "car")[i % 2]
        names = [f"{i}_src.jpg", f"{i}_trg.jpg"]
        for k, name in enumerate(names):
            _image(os.path.join(root, "JPEGImages", category, name), (120, 96), 10 * i + k)
        kps = lambda: rng.uniform(10, 86, (keypoints, 2)).round(1).tolist()  # noqa: E731
        ann = {"category": category, "src_imname": names[0], "trg_imname": names[1], "src_kps": kps(),
               "trg_kps": kps(), "kps_ids": list(range(keypoints)), "src_bndbox": [2, 2, 110, 90],
               "trg_bndbox": [4, 4, 115, 92], "viewpoint_variation": 0, "scale_variation": 0}
        with open(os.path.join(root, "PairAnnotation", "test", f"{i:06d}:{category}.json"), "w") as f:
            json.dump(ann, f)
    return root


CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "014.Indigo_Bunting")
CUB_PARTS = ("back", "beak", "belly", "tail")
CUB_ATTRIBUTES = ("has_bill_shape::hooked", "has_wing_color::black", "has_wing_color::blue")


def write_cub(root: str, per_class: int = 4, test_from: int = 1) -> str:
    """CUB_200_2011/{images/, images.txt, classes.txt, image_class_labels.txt,
    train_test_split.txt, bounding_boxes.txt, parts/, attributes/}; images with index
    >= test_from within a class are in the test split."""
    for sub in ("images", "parts", "attributes"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    images, labels, split, boxes, locs, attr_rows = [], [], [], [], [], []
    image_id = 0
    for c, name in enumerate(CUB_CLASSES, 1):
        os.makedirs(os.path.join(root, "images", name), exist_ok=True)
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k}.jpg"
            _image(os.path.join(root, "images", rel), (80, 64), image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {0 if k >= test_from else 1}")
            boxes.append(f"{image_id} 4.0 4.0 70.0 55.0")
            for p in range(1, len(CUB_PARTS) + 1):
                visible = int((image_id + p) % 4 != 0)
                locs.append(f"{image_id} {p} {10.0 + 12 * p if visible else 0} {12.0 + 9 * p if visible else 0} {visible}")
            for a in range(1, len(CUB_ATTRIBUTES) + 1):
                attr_rows.append(f"{image_id} {a} {int((a + c) % 2 == 0)} 3 1.0")

    def write(rel, lines):
        with open(os.path.join(root, rel), "w") as f:
            f.write("\n".join(lines) + "\n")

    write("images.txt", images)
    write("image_class_labels.txt", labels)
    write("classes.txt", [f"{c} {n}" for c, n in enumerate(CUB_CLASSES, 1)])
    write("train_test_split.txt", split)
    write("bounding_boxes.txt", boxes)
    write("parts/parts.txt", [f"{p} {n}" for p, n in enumerate(CUB_PARTS, 1)])
    write("parts/part_locs.txt", locs)
    write("attributes/attributes.txt", [f"{a} {n}" for a, n in enumerate(CUB_ATTRIBUTES, 1)])
    write("attributes/image_attribute_labels.txt", attr_rows)
    return root


def write_blink(folder: str, items: int = 4) -> str:
    """A BLINK-style jsonl (BLINK's own field names) with 2-option depth items; returns its path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(items):
        _image(os.path.join(folder, f"depth_{i}.png"), (64, 64), 100 + i)
        rows.append({"idx": f"val_Relative_Depth_{i}", "sub_task": "Relative_Depth",
                     "prompt": "Which point is closer to the camera?", "choices": ["A", "B"],
                     "answer": "(A)" if i % 2 == 0 else "(B)", "image_1": f"depth_{i}.png"})
    path = os.path.join(folder, "blink.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
