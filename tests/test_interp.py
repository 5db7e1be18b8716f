"""Logit lens, patch-grid geometry, region readouts, answer scoring, attribution, `vlm-jax lens`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

import hf_factory
import vlm_jax as vj
from vlm_jax.cli import main as cli_main
from vlm_jax.demo import draw_shape_image
from vlm_jax.interp import readouts, scoring
from vlm_jax.interp.attribution import attribution_patching, edit_gradient, logit_difference
from vlm_jax.interp.geometry import ImageGeometry, patch_positions
from vlm_jax.interp.logit_lens import (decode_ids, gather_positions, ids_for_words, label_token_ids, lens_logits,
                                       logit_lens, mean_pairwise_jaccard, region_token_sets, stack_residuals)


@pytest.fixture(scope="module")
def model(random_llava):
    return vj.load(random_llava, progress=False)


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare(["USER: <image>\nwhat color is the circle ? ASSISTANT:",
                          "USER: <image> <image>\nwhich is bigger ? ASSISTANT:"],
                         images=[draw_shape_image(seed=0), draw_shape_image(seed=1), draw_shape_image(seed=2)])


# --- logit lens -------------------------------------------------------------------------------

def test_lens_at_the_last_layer_is_the_models_own_top_k(model, batch):
    out = model.run(batch, capture=("text.embed", "text.resid_post"))
    resid = stack_residuals(out.acts)
    lens = logit_lens(model.params, model.config, resid, k=5)
    logits = np.asarray(out.logits)
    want = np.argsort(-logits, axis=-1)[..., :5]
    np.testing.assert_array_equal(np.asarray(lens.top_ids[-1]), want)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(lens.top_probs[-1]), np.take_along_axis(probs, want, -1), rtol=1e-5)


def test_lens_chunks_positions_targets_and_ranks(model, batch):
    out = model.run(batch, capture=("text.embed", "text.resid_post"))
    positions = np.nonzero(batch.image_tokens.image_mask[1])[0][None]  # row 1's image tokens
    states = gather_positions(stack_residuals(out.acts)[:, 1:2], positions)  # [L + 1, 1, P, D]
    targets = np.array([[10, -1], [12, 40]], np.int32)  # one single-token and one two-token label
    small = logit_lens(model.params, model.config, states, k=3, targets=targets, chunk=7)
    whole = logit_lens(model.params, model.config, states, k=3, targets=targets, chunk=4096)
    for a, b in zip(small.__dict__.values(), whole.__dict__.values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logits = np.asarray(lens_logits(model.params, model.config, states)).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    rank = lambda t: (logits > logits[..., t:t + 1]).sum(-1)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(small.first_rank[..., 0]), rank(10))
    np.testing.assert_array_equal(np.asarray(small.best_rank[..., 1]), np.minimum(rank(12), rank(40)))
    np.testing.assert_allclose(np.asarray(small.best_prob[..., 1]), np.maximum(probs[..., 12], probs[..., 40]),
                               rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(small.first_rank[..., 0])[np.asarray(small.top_ids[..., 0]) == 10] == 0)


def test_label_ids_decoding_and_filters(model):
    tok = model.processor.tokenizer
    ids = label_token_ids(tok, ["red", "blue circle"])
    assert ids.shape == (2, 2) and ids[0, 1] == -1 and ids[1, 1] != -1
    assert decode_ids(tok, ids[:, :1]).reshape(-1).tolist() == ["red", "blue"]
    colours = ids_for_words(tok, ["red", "blue", "notaword"])
    assert colours == {tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("blue")}


def test_region_sets_and_mean_pairwise_jaccard():
    top1 = np.array([[1, 1, 2, 2, 3, 9],   # layer 0: region sets {1}, {2}, {3, 9}
                     [5, 5, 5, 5, 5, 5]])  # layer 1: every region decodes to {5}
    regions = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    sets = region_token_sets(top1, regions, ignore_ids=[9])
    assert sets[0] == [{1}, {2}, {3}]
    np.testing.assert_allclose(mean_pairwise_jaccard(top1, regions), [0.0, 1.0])
    np.testing.assert_allclose(mean_pairwise_jaccard(np.array([[1, 2, 1, 3]]), [np.array([0, 1]), np.array([2, 3])]),
                               [1 / 3])


# --- geometry ---------------------------------------------------------------------------------

def _find_marker(pixel_values: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the bright marker in a processed image [3, H, W]."""
    bright = pixel_values.mean(0) > 1.2  # white after CLIP normalisation is ~1.9; black and padding below
    ys, xs = np.nonzero(bright)
    return xs.mean() + 0.5, ys.mean() + 0.5


@pytest.mark.parametrize("size, do_pad", [((120, 80), False), ((70, 150), False), ((120, 80), True)])
def test_geometry_follows_the_processors_resize_and_crop(size, do_pad):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                       do_pad=do_pad)
    geometry = ImageGeometry.from_processor(processor, size, patch_size=14)
    assert geometry.grid == (4, 4)
    width, height = size
    for cx, cy in [(0.5 * width, 0.5 * height), (0.6 * width, 0.45 * height), (0.45 * width, 0.58 * height)]:
        img = Image.new("RGB", size, "black")
        ImageDraw.Draw(img).rectangle([cx - 4, cy - 4, cx + 3, cy + 3], fill="white")
        processed = np.asarray(processor(images=[img], return_tensors="np")["pixel_values"][0])
        got = _find_marker(processed)
        want = geometry.to_processed(np.array([cx, cy]))
        np.testing.assert_allclose(got, want, atol=1.5)
    back = geometry.to_original(geometry.to_processed(np.array([[10.0, 20.0]])))
    np.testing.assert_allclose(back, [[10.0, 20.0]], atol=1e-9)


def test_boxes_masks_keypoints_to_patches(model, batch):
    processor = model.processor.hf.image_processor
    geometry = ImageGeometry.from_processor(processor, (96, 96), patch_size=14)  # 96 -> 56, no crop
    assert geometry.grid == (4, 4)
    # a box over the top-left quarter of the original image = the top-left 2x2 patches
    np.testing.assert_array_equal(geometry.box_patches((0, 0, 48, 48), min_coverage=0.5),
                                  np.kron([[1, 0], [0, 0]], np.ones((2, 2))).astype(bool))
    mask = np.zeros((96, 96), bool)
    mask[48:, 48:] = True
    np.testing.assert_allclose(geometry.mask_coverage(mask), np.kron([[0, 0], [0, 1]], np.ones((2, 2))))
    np.testing.assert_array_equal(geometry.patch_of(np.array([[95.0, 0.0], [30.0, 60.0]])), [[0, 3], [2, 1]])
    np.testing.assert_allclose(geometry.to_grid(np.array([48.0, 48.0])), [1.5, 1.5])
    row, grid = batch.image_tokens.grid_positions(0)
    tokens = patch_positions(grid, geometry.mask_patches(mask))
    assert row == 0 and len(tokens) == 4
    assert set(batch.image_tokens.patch_row[0, tokens]) == {2, 3}


# --- readouts ---------------------------------------------------------------------------------

def _cos(a, b):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T


def test_maxsim_matches_a_direct_computation():
    rng = np.random.RandomState(0)
    hidden = rng.randn(3, 20, 8).astype(np.float32)
    ref, cands = np.array([0, 1, 2]), [np.array([5, 6]), np.array([7]), np.array([8, 9, 10, 11])]
    got = np.asarray(readouts.maxsim_scores(hidden, ref, cands))
    for layer in range(3):
        for c, cand in enumerate(cands):
            want = _cos(hidden[layer, ref], hidden[layer, cand]).max(axis=1).mean()
            np.testing.assert_allclose(got[layer, c], want, rtol=1e-5)


def test_bilinear_keypoints_and_gram_similarity():
    rng = np.random.RandomState(1)
    grid = rng.randn(2, 3, 4, 5).astype(np.float32)  # [L, rows, cols, D]
    at = np.asarray(readouts.bilinear_sample(grid, np.array([[1.0, 2.0], [0.5, 0.0], [1.25, 2.5]], np.float32)))
    np.testing.assert_allclose(at[:, 0], grid[:, 1, 2], rtol=1e-6)
    np.testing.assert_allclose(at[:, 1], 0.5 * (grid[:, 0, 0] + grid[:, 1, 0]), rtol=1e-6)
    want = (0.75 * (0.5 * grid[:, 1, 2] + 0.5 * grid[:, 1, 3]) + 0.25 * (0.5 * grid[:, 2, 2] + 0.5 * grid[:, 2, 3]))
    np.testing.assert_allclose(at[:, 2], want, rtol=1e-5)
    # keypoint cosine of an image with itself at the same points is 1
    hidden = grid.reshape(2, 12, 5)
    positions = np.arange(12).reshape(3, 4)
    pts = np.array([[0.3, 1.7], [2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(readouts.keypoint_cosine(hidden, positions, pts, hidden, positions, pts)),
                               1.0, rtol=1e-5)
    a, b = rng.randn(2, 6, 5), rng.randn(2, 9, 5)
    got = np.asarray(readouts.gram_similarity(a.astype(np.float32), b.astype(np.float32)))
    for layer in range(2):
        ga, gb = a[layer].T @ a[layer], b[layer].T @ b[layer]
        np.testing.assert_allclose(got[layer], (ga * gb).sum() / np.linalg.norm(ga) / np.linalg.norm(gb), rtol=1e-5)


def test_readouts_run_on_model_states(model, batch):
    out = model.run(batch, capture=("text.embed", "text.resid_post"))
    hidden = stack_residuals(out.acts)[:, 1]  # row 1 holds images 1 and 2
    _, grid1 = batch.image_tokens.grid_positions(1)
    _, grid2 = batch.image_tokens.grid_positions(2)
    scores = readouts.maxsim_scores(hidden, grid1[:2, :2].reshape(-1), [grid2[:2, :2].reshape(-1), grid2[2:, 2:].reshape(-1)])
    assert scores.shape == (model.config.text.num_layers + 1, 2)
    match = readouts.keypoint_match(hidden, grid1, np.array([[1.0, 1.0]]), hidden, grid2, np.array([[1.0, 1.0], [3.0, 3.0]]))
    assert match.shape == (model.config.text.num_layers + 1, 1)


# --- scoring ----------------------------------------------------------------------------------

def test_parse_letter():
    assert scoring.parse_letter("B) a red circle") == "B"
    assert scoring.parse_letter(" (C") == "C"
    assert scoring.parse_letter("Answer: D.") == "D"
    assert scoring.parse_letter("Because of it") is None
    assert scoring.prefill("USER: q ASSISTANT:") == "USER: q ASSISTANT: The correct option is ("


def test_choice_by_generation_reads_the_generated_letter(model):
    prompts = ["USER: <image>\nwhich option ? A B C D ASSISTANT:"] * 2
    images = [draw_shape_image(seed=3), draw_shape_image(seed=4)]
    result = scoring.choose_by_generation(model, prompts, images, max_new_tokens=4)
    batch = model.prepare([scoring.prefill(p) for p in prompts], images=images)
    assert result.texts == model.generate(batch, 4).texts
    assert result.answers == [scoring.parse_letter(t) for t in result.texts]


def test_option_loglikelihood_matches_full_logits(model):
    prompts = ["USER: <image>\nwhat shape ? ASSISTANT:", "USER: <image>\nwhat colour ? ASSISTANT:"]
    images = [draw_shape_image(seed=5), draw_shape_image(seed=6)]
    options = [" circle", " red square", " A"]
    scores = scoring.option_loglikelihood(model, prompts, options, images)
    assert scores.shape == (2, 3)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            b = model.prepare(prompt + option, images=[images[i]])
            logits = np.asarray(model.run(b).logits[0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            n = len(model.processor.tokenizer.encode(option, add_special_tokens=False))
            ids = b.input_ids[0]
            want = sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids)))
            np.testing.assert_allclose(scores[i, j], want, rtol=1e-4)
    letters = scoring.choose_by_likelihood(model, prompts, options, images, letters=("A", "B", "C"))
    assert letters == [("A", "B", "C")[int(np.argmax(s))] for s in scores]


def test_blind_modes_and_answer_distribution(model):
    prompts, images = scoring.blind(["USER: <image>\nq ASSISTANT:"], [draw_shape_image()], "no_image")
    assert prompts == ["USER: q ASSISTANT:"] and images is None
    batch = model.prepare(prompts)
    assert batch.pixel_values is None and not batch.image_mask.any()
    _, blank = scoring.blind(["USER: <image>\nq ASSISTANT:"], [draw_shape_image()], "blank",
                             model.processor.hf.image_processor)
    processed = model.prepare("USER: <image>\nq ASSISTANT:", images=blank).pixel_values
    assert np.abs(processed).max() < 0.02  # the mean colour normalises to ~0
    report = scoring.answer_distribution(["A", "A", "B", None], correct=["A", "B", "B", "C"])
    assert report["counts"] == {"A": 2, "B": 1, "C": 0, "D": 0, "none": 1}
    assert report["accuracy"] == 0.5 and report["majority"] == "A" and report["majority_bias"] == 0.25
    assert "| count | 2 | 1 | 0 | 0 | 1 |" in scoring.format_distribution(report)


# --- attribution ------------------------------------------------------------------------------

def test_edit_gradient_and_attribution_patching(hf_checkpoints):
    import jax

    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    clean = hf_factory.make_batch(hf_config, 28, seed=0)
    corrupt = dict(clean, pixel_values=hf_factory.make_batch(hf_config, 28, seed=1)["pixel_values"])
    metric = logit_difference(position=-1, good=7, bad=11, row=0)
    value, grad = edit_gradient(model, corrupt, metric, "text.resid_post")
    assert grad.shape == (2, *clean["input_ids"].shape, 32)
    out = model.run(corrupt)
    np.testing.assert_allclose(float(value), float(out.logits[0, -1, 7] - out.logits[0, -1, 11]), rtol=1e-5)
    scores = attribution_patching(model, clean, corrupt, metric, "text.resid_post")
    assert scores.shape == (2, *clean["input_ids"].shape)
    # the last layer's estimate is exact for a patch of the final residual at the last position
    clean_acts = model.run(clean, capture=("text.resid_post",)).acts["text.resid_post"]
    last = np.zeros(clean["input_ids"].shape, bool)
    last[0, -1] = True
    patched = model.run(corrupt, edits=model.edits().patch("text.resid_post", clean_acts, layers=1, where=last))
    true_effect = float(metric(patched)) - float(value)
    assert abs(float(scores[1, 0, -1]) - true_effect) < 0.05 * abs(true_effect) + 1e-3
    assert isinstance(jax.tree.leaves(grad)[0], jax.Array)


# --- CLI --------------------------------------------------------------------------------------

def test_lens_command_writes_a_png_and_prints_a_table(random_llava, tmp_path, capsys):
    image = tmp_path / "shape.png"
    draw_shape_image().save(image)
    out = tmp_path / "lens.png"
    assert cli_main(["lens", "--model", random_llava, "--image", str(image), "--prompt", "what shape ?",
                     "--chat", "--out", str(out), "--layers", "0,1,2"]) == 0
    printed = capsys.readouterr().out
    assert "most frequent patch tokens" in printed and printed.count("\n") >= 5
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_block_top_k_is_exact():
    import jax
    import jax.numpy as jnp

    from vlm_jax.interp.logit_lens import _block_size, block_top_k

    rng = np.random.RandomState(3)
    logits = jnp.asarray(rng.randn(50, 32064).astype(np.float32))
    logits = logits.at[7, 100:105].set(9.0 + jnp.arange(5.0))  # the top 5 of a row in one block
    block = _block_size(32064, 5)
    assert block is not None and 32064 % block == 0
    values, ids = block_top_k(logits, 5, block)
    want_values, want_ids = jax.lax.top_k(logits, 5)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    assert _block_size(160, 5) is None
