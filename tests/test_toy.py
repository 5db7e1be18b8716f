"""The embedded toy VLM (checkpoints/toy-llava): a real HF checkpoint that transformers loads,
that vlm_jax reproduces exactly (parity through the real processor), and that answers
held-out questions as its card says."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import hf_factory
import vlm_jax as vj
from vlm_jax.datasets import questions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "checkpoints", "toy-llava")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(TOY, "config.json")),
                                reason="checkpoints/toy-llava is missing (experiments/toy/train_toy.py writes it)")


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf_model = LlavaForConditionalGeneration.from_pretrained(TOY, torch_dtype=torch.float32).eval()
    return vj.load(TOY, progress=False), hf_model, AutoProcessor.from_pretrained(TOY)


def _inputs(processor, n: int = 3, seed: int = 5):
    """Processor outputs for n held-out questions of different lengths, left padded."""
    rng = np.random.default_rng(seed)
    items = [questions.name_question(rng), questions.color_question(rng), questions.position_question(rng)][:n]
    processor.tokenizer.padding_side = "left"
    enc = processor(text=[it["prompt"] for it in items], images=[it["images"][0] for it in items],
                    return_tensors="np", padding=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}, items


def test_toy_checkpoint_is_small_and_documented():
    size = sum(os.path.getsize(os.path.join(TOY, f)) for f in os.listdir(TOY))
    assert size <= 30 * 2**20, f"toy checkpoint is {size / 2**20:.1f} MB"
    with open(os.path.join(TOY, "toy_card.json")) as f:
        card = json.load(f)
    assert card["script"] == "experiments/toy/train_toy.py" and "seed" in card and "command" in card
    scores = card["held_out_accuracy"]  # 200 held-out questions each, measured at the end of training
    assert scores["name"] >= 0.9 and scores["color"] >= 0.9, scores


def test_toy_fp32_parity_through_the_processor(toy):
    model, hf_model, processor = toy
    batch, _ = _inputs(processor)
    assert (batch["attention_mask"] == 0).any(), "want a padded batch"
    ref_logits, ref_text, ref_vision = hf_factory.hf_forward(hf_model, batch)
    out = model.run(batch, capture=("text.hidden_states", "vision.hidden_states"))
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(out.logits, ref_logits, valid) <= 1e-5
    for layer, ref in enumerate(ref_text):
        assert hf_factory.rel_err(np.asarray(out.acts["text.hidden_states"][layer]), ref, valid) <= 1e-5, layer
    for layer, ref in enumerate(ref_vision):
        assert hf_factory.rel_err(np.asarray(out.acts["vision.hidden_states"][layer]), ref) <= 1e-5, layer


def test_toy_greedy_generation_matches_transformers(toy):
    model, hf_model, processor = toy
    batch, _ = _inputs(processor)
    ours = np.asarray(model.generate(batch, 12, eos_token_ids=()).tokens)  # free running, like eos_token_id=None
    with torch.no_grad():
        ref = hf_model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=12,
                                do_sample=False, min_new_tokens=12, eos_token_id=None,
                                pad_token_id=processor.tokenizer.pad_token_id)
    np.testing.assert_array_equal(ours, ref[:, batch["input_ids"].shape[1]:].numpy())


def test_toy_bf16_top1_agrees(toy):
    model, hf_model, processor = toy
    batch, _ = _inputs(processor)
    ref_logits, _, _ = hf_factory.hf_forward(hf_model.to(torch.bfloat16), batch)
    hf_model.to(torch.float32)
    logits = np.asarray(vj.load(TOY, dtype="bfloat16", progress=False).run(batch).logits.astype("float32"))
    valid = batch["attention_mask"].astype(bool)
    agree = np.mean((logits.argmax(-1) == ref_logits.argmax(-1))[valid])
    assert agree >= 0.99, agree


def _accuracy(model, items) -> float:
    batch = model.prepare([it["prompt"] for it in items], images=[it["images"][0] for it in items])
    texts = model.generate(batch, 4).texts
    return float(np.mean([it["label"] in t.split() for it, t in zip(items, texts)]))


def test_toy_answers_held_out_name_and_colour_questions(toy):
    model = toy[0]
    rng = np.random.default_rng(2026)  # not the training stream (seeded by step) nor the card's eval seed
    names = [questions.name_question(rng) for _ in range(64)]
    colours = [questions.color_question(rng) for _ in range(96)]  # half about a lone shape, half one of two
    assert _accuracy(model, names) >= 0.9  # 1.00 when written
    assert _accuracy(model, colours) >= 0.9  # 0.94 when written
    one_of_two = [it for it in colours if len(it["entities"]) == 2]
    assert _accuracy(model, one_of_two) >= 0.75  # binds "the <shape>" to the right one of two objects (0.86)

