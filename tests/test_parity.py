"""vlm_jax vs transformers' PyTorch LLaVA: logits and every hidden state, fp32 and bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_factory
import vlm_jax as vj

TOL = 1e-5


@pytest.mark.parametrize("case", list(hf_factory.CASES))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_fp32_parity_logits_and_hidden_states(hf_checkpoints, case, padding):
    folder, hf_model, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding=padding)
    ref_logits, ref_text, ref_vision = hf_factory.hf_forward(hf_model, batch)

    model = vj.load(folder, progress=False)
    out = model.run(batch, capture=("text.hidden_states", "vision.hidden_states"))
    valid = batch["attention_mask"].astype(bool)

    assert out.logits.shape == ref_logits.shape
    assert hf_factory.rel_err(out.logits, ref_logits, valid) <= TOL
    ours_text = np.asarray(out.acts["text.hidden_states"])
    assert ours_text.shape[0] == len(ref_text)
    for layer, ref in enumerate(ref_text):
        assert hf_factory.rel_err(ours_text[layer], ref, valid) <= TOL, f"text hidden state {layer}"
    ours_vision = np.asarray(out.acts["vision.hidden_states"])
    assert ours_vision.shape[0] == len(ref_vision)
    for layer, ref in enumerate(ref_vision):
        assert hf_factory.rel_err(ours_vision[layer], ref) <= TOL, f"vision hidden state {layer}"


@pytest.mark.parametrize("case", ["clip-llama-mha", "siglip-mistral-sliding-full-nobias",
                                  "dinov2reg-swiglu-llama-bias-linear-rope"])
def test_fused_attention_path_matches_explicit(hf_checkpoints, case):
    folder, _, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case))
    model = vj.load(folder, progress=False)
    explicit = model.run(batch, fused_attention=False)
    fused = model.run(batch, fused_attention=True)
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(fused.logits, explicit.logits, valid) <= TOL


@pytest.mark.parametrize("case", ["clip-llama-mha", "dinov2-qwen2-mixed-sliding-interpolated"])
def test_bf16_top1_agreement(tmp_path, case):
    """A briefly trained model (confident like a real one), both sides in bfloat16."""
    hf_config = hf_factory.hf_config_dict(case)
    px = hf_factory.image_size(case)
    hf_model = hf_factory.build_hf_model(hf_config, seed=1)
    hf_factory.train_briefly(hf_model, hf_config, px)
    folder = hf_factory.save_hf_model(hf_model, tmp_path / "m")
    hf_model = hf_model.to(torch.bfloat16)
    model = vj.load(folder, dtype="bfloat16", progress=False)
    agree = total = 0
    for seed in range(8):
        batch = hf_factory.make_batch(hf_config, px, seed=seed, text="rule")
        ref_logits, _, _ = hf_factory.hf_forward(hf_model, batch)
        logits = np.asarray(model.run(batch).logits.astype("float32"))
        valid = batch["attention_mask"].astype(bool)
        agree += int(np.sum((logits.argmax(-1) == ref_logits.argmax(-1))[valid]))
        total += int(valid.sum())
    print(f"bf16 top-1 agreement {case}: {agree}/{total}")
    assert agree / total >= 0.99, f"bf16 top-1 agreement {agree}/{total}"


@pytest.mark.parametrize("case", ["clip-llama-mha", "siglip-mistral-sliding-full-nobias",
                                  "dinov2-qwen2-mixed-sliding-interpolated"])
def test_long_padded_sequences_match(hf_checkpoints, case):
    """Sequences longer than the causal query block (blocked attention path), left padded."""
    from vlm_jax.models.text_decoder import CAUSAL_BLOCK

    folder, hf_model, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding="left")
    rng = np.random.RandomState(5)
    extra = 2 * CAUSAL_BLOCK + 17
    ids = np.concatenate([batch["input_ids"], rng.randint(3, 100, (2, extra))], axis=1)
    mask = np.concatenate([batch["attention_mask"], np.ones((2, extra), np.int64)], axis=1)
    long_batch = dict(batch, input_ids=ids, attention_mask=mask)
    ref_logits, ref_text, _ = hf_factory.hf_forward(hf_model, long_batch)
    model = vj.load(folder, progress=False)
    out = model.run(long_batch, capture=("text.hidden_states",))
    valid = mask.astype(bool)
    assert hf_factory.rel_err(out.logits, ref_logits, valid) <= TOL
    for layer, ref in enumerate(ref_text):
        assert hf_factory.rel_err(out.acts["text.hidden_states"][layer], ref, valid) <= TOL
    # the explicit unblocked path (pattern captured) and the fused path agree with it
    with_pattern = model.run(long_batch, capture=("text.attn_pattern",), fused_attention=False)
    assert hf_factory.rel_err(with_pattern.logits, ref_logits, valid) <= TOL
    assert hf_factory.rel_err(model.run(long_batch, fused_attention=True).logits, ref_logits, valid) <= TOL
