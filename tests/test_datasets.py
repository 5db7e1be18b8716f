"""Synthetic data (deterministic, consistent annotations) and the real-dataset readers on fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.datasets import depth, hierarchy, questions
from vlm_jax.datasets.readers import read_blink_jsonl, read_cub, read_spair
from vlm_jax.datasets.shapes import NAMED_SHAPES, Entity, render_scene


def _same(a: dict, b: dict) -> bool:
    return (a["prompt"] == b["prompt"] and a.get("answer") == b.get("answer")
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["images"], b["images"])))


@pytest.mark.parametrize("make", [questions.name_question, questions.color_question, questions.position_question,
                                  questions.count_question, questions.caption,
                                  lambda rng, s: questions.correspondence_item(rng, "squiggle", s),
                                  lambda rng, s: depth.depth_item(rng, s),
                                  lambda rng, s: hierarchy.hierarchy_training_example(rng, s)])
def test_generators_are_deterministic_from_the_seed(make):
    a = make(np.random.default_rng(5), 64)
    b = make(np.random.default_rng(5), 64)
    c = make(np.random.default_rng(6), 64)
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("make", [questions.name_question, questions.color_question, questions.count_question,
                                  questions.caption, lambda rng, s: questions.correspondence_item(rng, "named", s)])
def test_shapes_are_upright_and_on_the_patch_grid(make):
    rng = np.random.default_rng(3)
    for _ in range(20):
        item = make(rng, 64)
        for entity in item["entities"]:
            assert entity.rotation == 0.0
            assert entity.center[0] % 8 == 0 and entity.center[1] % 8 == 0, entity.center


def test_place_reports_when_shapes_cannot_fit():
    from vlm_jax.datasets.shapes import place

    assert place(np.random.default_rng(0), [40.0], 64) is None  # larger than the image
    centers = place(np.random.default_rng(0), [12.0, 12.0], 64)
    assert centers is not None and np.hypot(*np.subtract(*centers)) > 26


def test_scene_boxes_and_masks_agree_and_occlusion_is_exact():
    near = Entity("square", "red", (30, 30), 12, 0.3)
    far = Entity("circle", "blue", (38, 34), 12)
    img, boxes, masks = render_scene([far, near], 64)
    assert masks.shape == (2, 64, 64) and not (masks[0] & masks[1]).any()  # the near one hides the far one
    for box, mask in zip(boxes, masks):
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box.astype(int))
    pixels = np.asarray(img)
    assert (pixels[masks[1]] == (215, 40, 40)).all()  # red where the square is visible


def test_correspondence_items_are_correct():
    rng = np.random.default_rng(0)
    for family in ("named", "squiggle"):
        for _ in range(10):
            item = questions.correspondence_item(rng, family, 64)
            match = item["entities"][item["correct"]]
            assert match.name == item["ref_entity"].name
            assert sum(e.name == item["ref_entity"].name for e in item["entities"]) == 1
            assert item["label"] == questions.LETTERS[item["correct"]]
            assert item["prompt"].endswith(questions.MC_PREFIX) and item["prompt"].count("<image>") == 2
            if family == "named":
                assert all(e.kind in NAMED_SHAPES for e in item["entities"])
            else:
                assert all(e.kind == "squiggle" for e in item["entities"])


def test_questions_answers_follow_the_scene():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ex = questions.position_question(rng, 64)
        target = next(e for e in ex["entities"] if e.kind in ex["prompt"].split("the ")[1])
        assert ex["label"] == questions.position_word(target.center, 64)
        ex = questions.count_question(rng, 64)
        assert ex["label"] == questions.NUMBER_WORDS[len(ex["entities"])]
        ex = questions.name_question(rng, 64)
        assert ex["answer"] == f" a {ex['entities'][0].kind}"
        for two in (False, True):  # colour of a lone shape, or of the named one of two
            ex = questions.color_question(rng, 64, two_shapes=two)
            assert len(ex["entities"]) == (2 if two else 1)
            asked = [e for e in ex["entities"] if not two or f"the {e.kind} ?" in ex["prompt"]]
            assert len(asked) == 1 and ex["label"] == asked[0].color
    mix = questions.training_mixture(rng, 60)
    named = [e for ex in mix for e in ex.get("entities", []) if ex["type"] != "count"]
    assert all(e.kind != "squiggle" for e in named)  # squiggles are never named in training


def test_depth_items_label_the_nearer_point():
    rng = np.random.default_rng(2)
    for _ in range(10):
        item = depth.depth_item(rng, 64)
        (xa, ya), (xb, yb) = item["points"]
        da, db = item["depth"][int(ya), int(xa)], item["depth"][int(yb), int(xb)]
        assert item["closer"] == (0 if da < db else 1) and item["label"] == "AB"[item["closer"]]


def test_hierarchy_levels_and_text():
    assert len(hierarchy.FINE_CLASSES) == 24
    item = hierarchy.fine_item(np.random.default_rng(0), shape="star", variant="dotted")
    assert item["labels"] == {"superordinate": "spiky", "coarse": "star", "fine": "dotted star"}
    assert hierarchy.text_only_prompt("star", "dotted").count("<image>") == 0
    assert "five sharp points covered in dots" in hierarchy.text_only_prompt("star", "dotted")


# ---------------------------------------------------------------------------------------------
# readers


def test_read_spair_fixture(tmp_path):
    root = tmp_path / "SPair-71k"
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (100, 80)).save(root / "JPEGImages" / "cat" / name)
    ann = {"category": "cat", "src_imname": "a.jpg", "trg_imname": "b.jpg", "src_kps": [[10, 20], [30, 40]],
           "trg_kps": [[15, 25], [35, 45]], "kps_ids": [3, 7], "src_bndbox": [1, 2, 90, 70],
           "trg_bndbox": [5, 5, 95, 75], "viewpoint_variation": 1, "scale_variation": 0}
    (root / "PairAnnotation" / "test" / "000001:cat.json").write_text(json.dumps(ann))
    (root / "PairAnnotation" / "test" / "000002:dog.json").write_text(json.dumps({**ann, "category": "dog"}))
    pairs = list(read_spair(str(root), "test", categories={"cat"}))
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["source_image"].endswith("JPEGImages/cat/a.jpg") and pair["keypoint_ids"] == [3, 7]
    assert pair["target_keypoints"][1] == [35.0, 45.0] and pair["source_box"] == (1.0, 2.0, 90.0, 70.0)
    with pytest.raises(FileNotFoundError, match="PairAnnotation"):
        list(read_spair(str(root), "trn"))


def test_read_cub_fixture(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images" / "001.Black_footed_Albatross").mkdir(parents=True)
    (root / "parts").mkdir()
    (root / "attributes").mkdir()
    Image.new("RGB", (50, 40)).save(root / "images" / "001.Black_footed_Albatross" / "x.jpg")
    Image.new("RGB", (50, 40)).save(root / "images" / "001.Black_footed_Albatross" / "y.jpg")
    (root / "images.txt").write_text("1 001.Black_footed_Albatross/x.jpg\n2 001.Black_footed_Albatross/y.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    (root / "bounding_boxes.txt").write_text("1 2.0 3.0 10.0 20.0\n2 0 0 50 40\n")
    (root / "parts" / "parts.txt").write_text("1 back\n2 beak\n")
    (root / "parts" / "part_locs.txt").write_text("1 1 5.0 6.0 1\n1 2 0 0 0\n2 2 7.0 8.0 1\n")
    (root / "attributes" / "attributes.txt").write_text("1 has_bill_shape::hooked\n2 has_wing_color::black\n")
    (root / "attributes" / "image_attribute_labels.txt").write_text("1 1 1 3 1.0\n1 2 0 3 1.0\n2 2 1 4 2.0\n")
    rows = read_cub(str(root), with_attributes=True)
    assert [r["split"] for r in rows] == ["train", "test"]
    assert rows[0]["labels"] == {"superordinate": "bird", "coarse": "albatross", "fine": "Black footed Albatross"}
    assert rows[0]["box"] == (2.0, 3.0, 12.0, 23.0) and rows[0]["parts"] == [{"part": "back", "xy": (5.0, 6.0)}]
    assert rows[0]["attributes"] == ["has_bill_shape::hooked"] and rows[1]["attributes"] == ["has_wing_color::black"]
    assert len(read_cub(str(root), split="test")) == 1


def test_read_blink_jsonl_fixture(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i1.png")
    rows = [{"idx": "val_Relative_Depth_1", "prompt": "Which point is closer?", "choices": ["A", "B"],
             "answer": "(B)", "image_1": "i1.png", "sub_task": "Relative_Depth"},
            {"id": 2, "question": "q", "options": ["x", "y", "z"], "answer": "C", "images": ["i1.png", "i1.png"]}]
    (tmp_path / "blink.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = read_blink_jsonl(str(tmp_path / "blink.jsonl"))
    assert [i["answer"] for i in items] == ["B", "C"] and items[0]["task"] == "Relative_Depth"
    assert items[1]["images"][0] == str(tmp_path / "i1.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "A"}))
    with pytest.raises(ValueError, match="needs images"):
        read_blink_jsonl(str(tmp_path / "bad.jsonl"))
