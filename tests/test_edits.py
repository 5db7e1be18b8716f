"""Edits vs the same interventions made on transformers' PyTorch model (hooks, 4D masks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_factory
import vlm_jax as vj

CASE = "clip-llama-mha"
GQA_CASE = "clip-gelu-llama3rope-gqa-tied-multilayer"


@pytest.fixture(scope="module")
def setup(hf_checkpoints):
    folder, hf_model, hf_config = hf_checkpoints(CASE)
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(CASE))
    image_mask = batch["input_ids"] == hf_factory.IMAGE_TOKEN
    text_mask = batch["attention_mask"].astype(bool) & ~image_mask
    return model, hf_model, batch, image_mask, text_mask


def hf_logits(hf_model, batch, attention_mask=None):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]) if attention_mask is None else attention_mask,
            pixel_values=torch.from_numpy(batch["pixel_values"]),
            position_ids=torch.from_numpy(hf_factory.positions(batch["attention_mask"])),
        )
    return out.logits.numpy()


def close(ours, ref, batch, tol=1e-5):
    valid = batch["attention_mask"].astype(bool)
    return hf_factory.rel_err(np.asarray(ours), ref, valid) <= tol


def test_empty_and_all_zero_edits_change_nothing_bitwise(setup):
    model, _, batch, image_mask, _ = setup
    plain = np.asarray(model.run(batch).logits)
    np.testing.assert_array_equal(np.asarray(model.run(batch, edits=model.edits()).logits), plain)
    nowhere = np.zeros_like(image_mask)
    edits = (model.edits().zero("text.resid_post", layers=1, where=nowhere)
             .add("text.mlp_out", np.ones(32), where=nowhere)
             .project_out("vision.resid_mid", np.ones(32), layers=0, where=np.zeros((3, 5), bool)))
    np.testing.assert_array_equal(np.asarray(model.run(batch, edits=edits).logits), plain)
    # An attention-edge edit runs the explicit softmax instead of the blocked attention (on CPU a
    # fused kernel): the same sums in another order, so equal to float32 rounding, not bitwise.
    edge = edits.block_attention("text", queries=nowhere, keys=nowhere)
    np.testing.assert_allclose(np.asarray(model.run(batch, edits=edge).logits), plain, rtol=1e-5, atol=1e-5)


def _replace_output(module, mask: np.ndarray, value):
    """A forward hook setting module output[mask] = value."""
    m = torch.from_numpy(mask)

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[m] = value if not isinstance(value, np.ndarray) else torch.from_numpy(value).to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return module.register_forward_hook(hook)


def test_zero_ablation_matches_a_transformers_hook(setup):
    model, hf_model, batch, image_mask, _ = setup
    handle = _replace_output(hf_model.model.language_model.layers[1], image_mask, 0.0)
    try:
        ref = hf_logits(hf_model, batch)
    finally:
        handle.remove()
    ours = model.run(batch, edits=model.edits().zero("text.resid_post", layers=1, where=image_mask)).logits
    assert close(ours, ref, batch)
    assert not close(model.run(batch).logits, ref, batch)  # the ablation does something


def test_mean_ablation_of_mlp_out_matches_a_transformers_hook(setup):
    model, hf_model, batch, _, text_mask = setup
    mean = np.random.RandomState(0).randn(32).astype(np.float32)
    handle = _replace_output(hf_model.model.language_model.layers[0].mlp, text_mask, mean)
    try:
        ref = hf_logits(hf_model, batch)
    finally:
        handle.remove()
    ours = model.run(batch, edits=model.edits().mean("text.mlp_out", mean, layers=0, where=text_mask)).logits
    assert close(ours, ref, batch)


def test_vision_and_projector_edits_match_transformers_hooks(setup):
    model, hf_model, batch, _, _ = setup
    patches = np.zeros((3, 5), bool)
    patches[:, 2] = True  # the second patch of every image
    proj_mask = np.zeros((3, 4), bool)
    proj_mask[1] = True  # all tokens of image 1
    handles = [
        _replace_output(hf_model.model.vision_tower.encoder.layers[0], patches, 0.0),
        _replace_output(hf_model.model.multi_modal_projector, proj_mask, 0.5),
    ]
    try:
        ref = hf_logits(hf_model, batch)
    finally:
        for h in handles:
            h.remove()
    edits = (model.edits().zero("vision.resid_post", layers=0, where=patches)
             .set("projector.out", 0.5, where=proj_mask))
    assert close(model.run(batch, edits=edits).logits, ref, batch)


def test_head_ablation_on_z_matches_a_pre_hook_on_o_proj(setup):
    model, hf_model, batch, _, text_mask = setup
    m = torch.from_numpy(text_mask)

    def pre_hook(mod, args):
        x = args[0].clone()
        head = x[..., 16:24]  # head 2 of 4, head_dim 8
        head[m] = 0.0
        x[..., 16:24] = head
        return (x,)

    handle = hf_model.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(pre_hook)
    try:
        ref = hf_logits(hf_model, batch)
    finally:
        handle.remove()
    edits = model.edits().zero("text.z", layers=1, heads=2, where=text_mask)
    assert close(model.run(batch, edits=edits).logits, ref, batch)


def _additive_mask(batch, extra: np.ndarray | None = None, value=None) -> torch.Tensor:
    """transformers' 4D eager mask (causal + padding) with `value` added at `extra` [B, T, S]."""
    valid = batch["attention_mask"].astype(bool)
    t = valid.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    minimum = np.finfo(np.float32).min
    mask = np.where(allowed, 0.0, minimum).astype(np.float32)
    if extra is not None:
        mask = np.where(extra & allowed, minimum if value is None else value, mask).astype(np.float32)
    return torch.from_numpy(mask[:, None])


def test_attention_knockout_matches_a_4d_attention_mask(setup):
    model, hf_model, batch, image_mask, text_mask = setup
    edges = text_mask[:, :, None] & image_mask[:, None, :]
    ref = hf_logits(hf_model, batch, attention_mask=_additive_mask(batch, edges))
    edits = model.edits().block_attention("text", queries=text_mask, keys=image_mask)
    assert close(model.run(batch, edits=edits).logits, ref, batch)
    # rescaling (before the softmax) by 3 is adding log(3) to those scores
    ref = hf_logits(hf_model, batch, attention_mask=_additive_mask(batch, edges, np.log(3.0)))
    edits = model.edits().scale_attention("text", 3.0, queries=text_mask, keys=image_mask)
    assert close(model.run(batch, edits=edits).logits, ref, batch)


def test_knockout_in_chosen_layers_and_heads_matches_per_layer_masks(hf_checkpoints):
    folder, hf_model, hf_config = hf_checkpoints(GQA_CASE)
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(GQA_CASE))
    image_mask = batch["input_ids"] == hf_factory.IMAGE_TOKEN
    last = np.zeros_like(image_mask)
    last[:, -1] = True
    edges = last[:, :, None] & image_mask[:, None, :]
    per_head = _additive_mask(batch).repeat(1, 4, 1, 1)  # [B, H, T, S]
    blocked = _additive_mask(batch, edges)[:, 0]
    per_head[:, 1] = blocked
    per_head[:, 3] = blocked

    def pre_hook(mod, args, kwargs):
        kwargs["attention_mask"] = per_head
        return args, kwargs

    handle = hf_model.model.language_model.layers[1].self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref = hf_logits(hf_model, batch)
    finally:
        handle.remove()
    edits = model.edits().block_attention("text", layers=[1], heads=[1, 3], queries=last, keys=image_mask)
    assert close(model.run(batch, edits=edits).logits, ref, batch)


def test_patching_a_run_with_its_own_activations_is_the_identity(setup):
    model, _, batch, _, _ = setup
    sites = ("text.resid_post", "text.attn_out", "text.z", "vision.resid_mid", "projector.out", "text.embed")
    clean = model.run(batch, capture=sites)
    edits = model.edits()
    for site in sites:
        edits = edits.patch(site, clean.acts[site])
    np.testing.assert_array_equal(np.asarray(model.run(batch, edits=edits).logits), np.asarray(clean.logits))


def test_patching_from_another_run_transfers_the_activation(setup):
    model, _, batch, image_mask, _ = setup
    other = dict(batch, pixel_values=batch["pixel_values"][::-1].copy())
    source = model.run(other, capture=("text.resid_post",)).acts["text.resid_post"]
    out = model.run(batch, edits=model.edits().patch("text.resid_post", source, layers=0, where=image_mask),
                    capture=("text.resid_post",))
    patched = np.asarray(out.acts["text.resid_post"][0])
    np.testing.assert_array_equal(patched[image_mask], np.asarray(source[0])[image_mask])
    np.testing.assert_array_equal(patched[~image_mask], np.asarray(model.run(batch, capture=(
        "text.resid_post",)).acts["text.resid_post"][0])[~image_mask])


def test_steering_and_projection(setup):
    model, _, batch, _, text_mask = setup
    rng = np.random.RandomState(1)
    direction = rng.randn(32).astype(np.float32)
    base = np.asarray(model.run(batch, capture=("text.resid_mid",)).acts["text.resid_mid"][1])
    steered = model.run(batch, capture=("text.resid_mid",),
                        edits=model.edits().add("text.resid_mid", direction, scale=2.0, layers=1, where=text_mask))
    got = np.asarray(steered.acts["text.resid_mid"][1])
    np.testing.assert_allclose(got[text_mask], base[text_mask] + 2.0 * direction, rtol=1e-6, atol=1e-6)
    projected = model.run(batch, capture=("text.resid_mid",),
                          edits=model.edits().project_out("text.resid_mid", direction, layers=1))
    unit = direction / np.linalg.norm(direction)
    along = np.asarray(projected.acts["text.resid_mid"][1]) @ unit
    assert np.max(np.abs(along)) < 1e-6 and np.max(np.abs(base @ unit)) > 1e-2


def test_vmapped_sweep_equals_one_by_one(setup):
    model, _, batch, image_mask, _ = setup
    sets = [model.edits().zero("text.resid_post", layers=layer, where=image_mask)
            .block_attention("vision", layers=layer % 3, queries=np.ones(5, bool), keys=np.ones(5, bool))
            for layer in range(2)]
    sets.append(model.edits().zero("text.resid_post", layers=0, where=np.zeros_like(image_mask))
                .block_attention("vision", layers=2, queries=np.ones(5, bool), keys=np.ones(5, bool)))
    swept = model.run_sweep(batch, sets, capture=("text.resid_post",))
    assert swept.logits.shape[0] == 3
    for i, edits in enumerate(sets):
        one = model.run(batch, edits=edits, capture=("text.resid_post",))
        np.testing.assert_allclose(np.asarray(swept.logits[i]), np.asarray(one.logits), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(swept.acts["text.resid_post"][i]),
                                   np.asarray(one.acts["text.resid_post"]), rtol=1e-5, atol=1e-6)


def test_gradient_of_an_additive_edit_matches_finite_differences(setup):
    """Attribution: d(logit difference)/d(additive edit), checked by central differences in float64."""
    model, _, batch, _, _ = setup
    from vlm_jax.models.llava import forward

    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), model.params)
        arrays = dict(model._arrays(batch), pixel_values=jnp.asarray(batch["pixel_values"], jnp.float64))

        def metric(delta):
            edits = model.edits().add("text.resid_mid", delta)  # per-layer delta [L, B, T, D]
            logits = forward(params, model.config, arrays, edits=edits).logits
            return logits[0, -1, 7] - logits[0, -1, 11]

        zeros = jnp.zeros((2, *batch["input_ids"].shape, 32), jnp.float64)
        grad = jax.jit(jax.grad(metric))(zeros)
        direction = jnp.asarray(np.random.RandomState(2).randn(*zeros.shape))
        eps = 1e-5
        f = jax.jit(metric)
        numeric = (f(eps * direction) - f(-eps * direction)) / (2 * eps)
        analytic = jnp.sum(grad * direction)
        assert abs(float(numeric) - float(analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))
        assert float(jnp.abs(grad[:, 1]).sum()) == 0.0  # row 1 cannot change row 0's logits


@pytest.mark.parametrize("keep_cls", [False, True])
def test_diagonal_vision_attention_makes_patches_independent(setup, keep_cls):
    model, _, batch, _, _ = setup
    edits = model.edits().diagonal_attention("vision", keep_class_token=keep_cls)
    perturbed = dict(batch, pixel_values=batch["pixel_values"].copy())
    perturbed["pixel_values"][0, :, :14, :14] += 1.0  # patch (0, 0) = token 1 of image 0
    site = ("vision.hidden_states",)
    a = np.asarray(model.run(batch, edits=edits, capture=site).acts["vision.hidden_states"])
    b = np.asarray(model.run(perturbed, edits=edits, capture=site).acts["vision.hidden_states"])
    changed = np.abs(a - b).max(axis=(0, 3)) > 1e-6  # [N, P]
    expected = np.zeros_like(changed)
    expected[0, 1] = True
    np.testing.assert_array_equal(changed, expected)
    plain_a = np.asarray(model.run(batch, capture=site).acts["vision.hidden_states"])
    plain_b = np.asarray(model.run(perturbed, capture=site).acts["vision.hidden_states"])
    assert (np.abs(plain_a - plain_b).max(axis=(0, 3)) > 1e-6)[0].sum() == 5  # without it: all tokens move


def test_bad_edits_are_clear_errors(setup):
    model, _, batch, image_mask, _ = setup
    with pytest.raises(KeyError, match="cannot be edited.*block_attention"):
        model.edits().zero("text.attn_pattern")
    with pytest.raises(KeyError, match="'text.resid' cannot be edited.*Editable sites"):
        model.edits().zero("text.resid")
    with pytest.raises(IndexError, match="layer 5 is out of range for the 2-layer text tower"):
        model.edits().zero("text.resid_post", layers=5)
    with pytest.raises(IndexError, match="head 4 is out of range"):
        model.edits().zero("text.z", heads=4)
    with pytest.raises(ValueError, match="heads= applies to per-head sites"):
        model.edits().zero("text.resid_post", heads=1)
    wrong = np.ones((2, image_mask.shape[1] + 1), bool)
    with pytest.raises(ValueError, match=r"mask has \(batch, positions\) = \(2, 19\) but the run has \(2, 18\)"):
        model.run(batch, edits=model.edits().zero("text.resid_post", where=wrong))
    no_image = {"input_ids": np.array([[1, 5, 6]]), "attention_mask": np.ones((1, 3), np.int64)}
    with pytest.raises(ValueError, match="needs pixel_values"):
        model.run(no_image, edits=model.edits().zero("vision.resid_post", layers=0))
    with pytest.raises(ValueError, match="explicit attention path"):
        model.run(batch, fused_attention=True, edits=model.edits().diagonal_attention("vision"))
    with pytest.raises(ValueError, match="edges have shape"):
        model.run(batch, edits=model.edits().block_attention("text", queries=np.ones(3, bool), keys=np.ones(3, bool)))


def test_prefix_shared_sweep_equals_one_by_one(setup):
    """Text-only edit sets take the prefix-sharing path; results match single runs."""
    from vlm_jax.interp.sweep import first_edited_layers

    model, _, batch, image_mask, text_mask = setup
    last = np.full((2, 1), batch["input_ids"].shape[1] - 1, np.int32)
    sets = [model.edits().zero("text.resid_post", layers=1, where=image_mask).block_attention(
                "text", layers=1, queries=text_mask, keys=image_mask),
            model.edits().zero("text.resid_post", layers=0, where=image_mask).block_attention(
                "text", layers=1, queries=text_mask, keys=image_mask),
            model.edits().zero("text.resid_post", layers=1, where=np.zeros_like(image_mask)).block_attention(
                "text", layers=1, heads=[], queries=text_mask, keys=image_mask)]
    from vlm_jax.interp.edits import stack_edits

    assert first_edited_layers(stack_edits(sets), 3) == [1, 0, 2]  # the third set edits nothing
    swept = model.run_sweep(batch, sets, logit_positions=last)
    for i, edits in enumerate(sets):
        one = model.run(batch, edits=edits, logit_positions=last)
        np.testing.assert_allclose(np.asarray(swept.logits[i]), np.asarray(one.logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(swept.logits[2]), np.asarray(model.run(batch, logit_positions=last).logits),
                               rtol=1e-5, atol=1e-6)
