"""KV-cache decoding vs transformers' generate()."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_factory
import vlm_jax as vj
from vlm_jax import generate as gen
from vlm_jax.models import llava, text_decoder


def hf_generate(hf_model, batch, max_new_tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(batch["pixel_values"]), max_new_tokens=max_new_tokens, do_sample=False,
            **kwargs,
        )
    return out[:, batch["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("case", ["clip-llama-mha", "siglip-mistral-sliding-full-nobias",
                                  "dinov2-qwen2-mixed-sliding-interpolated"])
def test_greedy_generation_matches_transformers(hf_checkpoints, case):
    folder, hf_model, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding="left")
    # no EOS: both sides produce all 24 tokens
    ref = hf_generate(hf_model, batch, 24, eos_token_id=None, min_new_tokens=24)
    model = vj.load(folder, progress=False)
    ours = model.generate(batch, 24, eos_token_ids=())
    assert ours.tokens.shape == (2, 24)
    np.testing.assert_array_equal(ours.tokens, ref)


def test_greedy_generation_of_a_single_row_matches_transformers(hf_checkpoints):
    """Batch 1 compiles differently on CPU (XLA drops the size-1 axis), so it is checked on its own."""
    folder, hf_model, hf_config = hf_checkpoints("clip-llama-mha")
    pair = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    real = pair["attention_mask"][1] > 0  # row 1 shows the third image
    row = {"input_ids": pair["input_ids"][1:2, real], "attention_mask": pair["attention_mask"][1:2, real],
           "pixel_values": pair["pixel_values"][2:3]}
    ref = hf_generate(hf_model, row, 12, eos_token_id=None, min_new_tokens=12)
    ours = vj.load(folder, progress=False).generate(row, 12, eos_token_ids=())
    np.testing.assert_array_equal(ours.tokens, ref)


def test_unstacked_layers_equal_the_stacked_scan(hf_checkpoints):
    """text_decoder.unstack_layers (what generation runs on) gives the stacked scan's results:
    captures and logits of a forward pass, rematerialised gradients, and a prefill plus one
    cached step."""
    case = "dinov2-qwen2-mixed-sliding-interpolated"  # layers differ in their attention window
    folder, _, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding="left")
    model = vj.load(folder, progress=False)
    cfg, stacked = model.config, model.params
    unstacked = {**stacked, "language_model": text_decoder.unstack_layers(stacked["language_model"])}
    inputs = {k: jnp.asarray(v) for k, v in batch.items()}
    capture = ("text.resid_post", "text.attn_pattern")
    a = llava.forward(stacked, cfg, inputs, capture=capture)
    b = llava.forward(unstacked, cfg, inputs, capture=capture)
    for got, want in ((b.logits, a.logits), *((b.acts[s], a.acts[s]) for s in capture)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    def loss(params):  # rematerialised layers: the same gradients either way
        return jnp.mean(jnp.square(llava.forward(params, cfg, inputs, remat=True).logits))

    g_stacked, g_unstacked = jax.grad(loss)(stacked), jax.grad(loss)(unstacked)
    for i in (0, cfg.text.num_layers - 1):
        for name in ("q_proj", "o_proj"):
            np.testing.assert_allclose(
                np.asarray(g_unstacked["language_model"]["layers"][i]["self_attn"][name]["kernel"]),
                np.asarray(g_stacked["language_model"]["layers"]["self_attn"][name]["kernel"][i]), rtol=1e-4, atol=1e-6)

    n, t = batch["input_ids"].shape
    key_valid = jnp.concatenate([inputs["attention_mask"].astype(bool), jnp.ones((n, 1), bool)], axis=1)
    positions = llava.default_positions(inputs["attention_mask"])
    step_inputs = {"input_ids": jnp.full((n, 1), 5, jnp.int32), "position_ids": positions[:, -1:] + 1}
    logits = []
    for params, per_layer in ((stacked, False), (unstacked, True)):
        cache = text_decoder.init_cache(cfg.text, n, t + 1, jnp.float32, per_layer=per_layer)
        prefill = llava.forward(params, cfg, {**inputs, "position_ids": positions}, cache=cache, cache_index=0,
                                key_valid=key_valid)
        step = llava.forward(params, cfg, step_inputs, cache=prefill.cache, cache_index=t, key_valid=key_valid)
        logits.append((prefill.logits, step.logits))
        if per_layer:
            assert isinstance(step.cache, tuple) and len(step.cache) == cfg.text.num_layers
            assert step.cache[0]["k"].shape == (n * cfg.text.num_kv_heads, t + 1, cfg.text.head_dim)
    for got, want in zip(logits[1], logits[0]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_short_generations_are_prefixes_of_long_ones(hf_checkpoints):
    """0, 1 and 2 new tokens (the last token is emitted after the decode loop, which runs
    max_new_tokens - 1 forwards) give the first tokens of a longer run."""
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    model = vj.load(folder, progress=False)
    long = model.generate(batch, 6, eos_token_ids=()).tokens
    for n in (0, 1, 2):
        short = model.generate(batch, n, eos_token_ids=()).tokens
        assert short.shape == (2, n)
        np.testing.assert_array_equal(short, long[:, :n])


def test_bad_generation_requests_are_refused(hf_checkpoints):
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    model = vj.load(folder, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(batch, -1)
    cfg = model.config.text
    embeds = jnp.zeros((1, 4, cfg.hidden_size))
    cache = text_decoder.init_cache(cfg, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="layer_range .* cannot update a key/value cache"):
        text_decoder.forward(model.params["language_model"], cfg, embeds, jnp.zeros((1, 4), jnp.int32),
                             jnp.ones((1, 8), bool), cache=cache, layer_range=(0, 1))


def test_eos_stops_a_row_and_pads_like_transformers(hf_checkpoints):
    folder, hf_model, hf_config = hf_checkpoints("clip-llama-mha")
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"))
    free = hf_generate(hf_model, batch, 20, eos_token_id=None, min_new_tokens=20)
    eos = int(free[0, 5])  # a token row 0 emits at step 5 becomes the EOS
    ref = hf_generate(hf_model, batch, 20, eos_token_id=eos, pad_token_id=hf_factory.PAD)
    model = vj.load(folder, progress=False)
    ours = model.generate(batch, 20, eos_token_ids=(eos,), pad_token_id=hf_factory.PAD)
    width = ref.shape[1]  # transformers stops once every row is done
    np.testing.assert_array_equal(ours.tokens[:, :width], ref)
    assert np.all(ours.tokens[:, width:] == hf_factory.PAD)
    assert ours.tokens[0, 5] == eos and np.all(ours.tokens[0, 6:] == hf_factory.PAD)


def test_right_padding_gives_the_same_tokens_as_left_padding(hf_checkpoints):
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    left = hf_factory.make_batch(hf_config, 28, padding="left")
    right = hf_factory.make_batch(hf_config, 28, padding="right")
    np.testing.assert_array_equal(model.generate(left, 12, eos_token_ids=()).tokens,
                                  model.generate(right, 12, eos_token_ids=()).tokens)


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_checkpoints):
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, 28)
    greedy = model.generate(batch, 10, eos_token_ids=()).tokens
    top1 = model.generate(batch, 10, do_sample=True, top_k=1, seed=3, eos_token_ids=()).tokens
    np.testing.assert_array_equal(greedy, top1)
    a = model.generate(batch, 10, do_sample=True, temperature=2.0, seed=7, eos_token_ids=()).tokens
    b = model.generate(batch, 10, do_sample=True, temperature=2.0, seed=7, eos_token_ids=()).tokens
    c = model.generate(batch, 10, do_sample=True, temperature=2.0, seed=8, eos_token_ids=()).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_greedy_token_is_argmax_with_its_ties_and_nans():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[1, [7, 200]] = 10.0  # a tie: the first index
    logits[2, [3, 50]] = np.nan  # NaN: the first NaN, as jnp.argmax
    logits[3, :] = -np.inf
    logits[4, -1] = np.inf
    got = jax.jit(gen.greedy_token)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_array_equal(got[1:3], [7, 3])


def test_top_p_keeps_the_nucleus_only():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    sampling = gen.Sampling(do_sample=True, top_p=0.7)
    draws = {int(gen.choose_token(logits, sampling, jax.random.key(i))[0]) for i in range(200)}
    assert draws == {0, 1}


def test_one_compilation_per_length_bucket(hf_checkpoints):
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, 28)
    compiled = gen.compiled_generate(model.params)
    model.generate(batch, 8, eos_token_ids=())
    before = compiled._cache_size()
    width = batch["input_ids"].shape[1]

    def left_padded(columns):  # the same prompts, `columns` padding columns wider
        return {k: (np.pad(v, ((0, 0), (columns, 0))) if k != "pixel_values" else v) for k, v in batch.items()}

    full = gen.prompt_width(width)
    model.generate(left_padded(full - width), 5, eos_token_ids=())  # as wide as its bucket, fewer tokens: same program
    assert compiled._cache_size() == before
    model.generate(left_padded(full - width + 1), 5, eos_token_ids=())  # one column more: the next bucket
    assert compiled._cache_size() == before + 1
    gen.generate(model.params, model.config, batch, 8, prompt_bucket=full + 1)  # a width of its own: one more program
    assert compiled._cache_size() == before + 2


def test_prompt_width_pads_at_most_a_sixteenth():
    widths = [gen.prompt_width(n) for n in range(1, 5000)]
    assert all(w >= n for n, w in enumerate(widths, 1)) and widths == sorted(widths)
    assert all(w - n < max(16, n / 16) for n, w in enumerate(widths, 1))
    assert gen.prompt_width(601) == 608 and gen.prompt_width(640) == 640 and gen.prompt_width(641) == 672
    assert len(set(widths[512:1024])) == 16  # lengths 513-1024: 16 programs per doubling of the length
    assert gen.prompt_width(601, 64) == 640 and gen.prompt_width(601, 1) == 601


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_loop_never_copies_the_cache(hf_checkpoints, rows):
    """The compiled generate program (CPU options) writes each layer's cache in place and its
    attention reads that same buffer: no op copies a whole cache buffer. With a [B, K, S, E]
    cache, XLA CPU copied each layer's cache several times per decode step (batch-4 step of
    the 62M CPU model 38.9 vs 15.7 ms; benchmarks/RESULTS.md)."""
    import re

    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    ids, mask = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    pixels = batch["pixel_values"][:rows]  # one image per row in this case
    text = model.config.text
    slots = ids.shape[1] + 16
    hlo = gen.decode_program_text(model.params, model.config, ids, mask, pixels, new_slots=16)
    cache_size = rows * text.num_kv_heads * slots * text.head_dim

    def is_cache_buffer(shape: str) -> bool:  # e.g. f32[2,4,40,16]{3,2,1,0}: any layout of one layer's cache
        dims = [int(d) for d in re.match(r"f32\[([\d,]*)\]", shape).group(1).split(",") if d]
        return slots in dims and int(np.prod(dims)) == cache_size

    ops = [re.match(r"\s*(?:ROOT )?%\S+ = (f32\[\S+) (\S+)\(", line) for line in hlo.splitlines()]
    cache_ops = [(m.group(2), m.group(0)) for m in ops if m and is_cache_buffer(m.group(1))]
    assert cache_ops, "no op of a cache buffer's size found: the test no longer sees the cache"
    copies = [text for kind, text in cache_ops if kind == "copy"]
    assert not copies, "the decode program copies whole cache buffers:\n" + "\n".join(copies)


def test_prefill_runs_the_stacked_layers_in_one_scan(hf_checkpoints):
    """generate's prefill is one lax.scan over the stacked decoder layers (but the last, which
    runs at the last position only: test_prefill_computes_the_last_layer_at_the_last_position_only),
    filling a stacked cache of the prompt's slots; only the decode loop runs on per-layer copies.
    Run unrolled on those copies, the prefill of the 62M CPU model took 0.335 against 0.303 s at
    batch 1 (benchmarks/RESULTS.md)."""
    from functools import partial

    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    ids, mask = gen.left_align(batch["input_ids"], batch["attention_mask"], 0)
    text = model.config.text
    program = partial(gen._generate, config=model.config, new_slots=8, sampling=gen.Sampling(), eos_ids=(),
                      pad_id=0, fused=False)
    jaxpr = jax.make_jaxpr(program)(model.params, input_ids=ids, attention_mask=mask,
                                    pixel_values=batch["pixel_values"], rng=jax.random.key(0), max_new_tokens=8)
    cache_rows = ids.shape[0] * text.num_kv_heads
    stacked_cache = (text.num_layers, cache_rows, ids.shape[1], text.head_dim)
    prefill_scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"
                     and eqn.params["length"] == text.num_layers - 1
                     and any(tuple(v.aval.shape) == stacked_cache for v in eqn.outvars)]
    assert len(prefill_scans) == 1, "the prefill is not one scan over the stacked layers writing a stacked cache"
    loops = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "while"]
    assert len(loops) == 1 and not any(sub.primitive.name == "scan" for sub in loops[0].params["body_jaxpr"].eqns), \
        "the decode loop should run unrolled layers on per-layer weights"


def test_prefill_computes_the_last_layer_at_the_last_position_only(hf_checkpoints):
    """last_position_only (generate's prefill): the same next-token logits and the same cache as
    a full prefill, for less work: the last layer's queries, attention, output projection and MLP
    run at one position per row (8% of the CPU preset's batch-4 prefill, benchmarks/RESULTS.md)."""
    case = "clip-gelu-llama3rope-gqa-tied-multilayer"
    folder, _, hf_config = hf_checkpoints(case)
    model = vj.load(folder, progress=False)
    cfg, text = model.config, model.config.text
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding="left")
    ids, mask = gen.left_align(batch["input_ids"], batch["attention_mask"], 0)
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
              "position_ids": llava.default_positions(jnp.asarray(mask)), "pixel_values": batch["pixel_values"]}
    rows, width = ids.shape
    last = jnp.full((rows, 1), width - 1, jnp.int32)

    def prefill(params, last_only):
        cache = text_decoder.init_cache(text, rows, width, params["language_model"]["embed_tokens"]["embedding"].dtype)
        out = llava.forward(params, cfg, inputs, cache=cache, cache_index=0, key_valid=jnp.asarray(mask, bool),
                            last_position_only=last_only, logit_positions=None if last_only else last)
        return out.logits, out.cache

    full, short = (jax.jit(prefill, static_argnums=1).lower(model.params, flag).compile() for flag in (False, True))
    (full_logits, full_cache), (logits, cache) = full(model.params), short(model.params)
    assert logits.shape == full_logits.shape == (rows, 1, cfg.text.vocab_size)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
    for name in ("k", "v"):
        np.testing.assert_allclose(cache[name], full_cache[name], rtol=1e-5, atol=1e-6)
    # the last layer's MLP products: one row per sequence instead of every position (the scan body
    # of the other layers has them at rows * width)
    one_row_mlp = f"f32[{rows},{text.intermediate_size}]"
    assert one_row_mlp in str(jax.make_jaxpr(prefill, static_argnums=1)(model.params, True))
    assert one_row_mlp not in str(jax.make_jaxpr(prefill, static_argnums=1)(model.params, False))
    with pytest.raises(ValueError, match="last_position_only"):
        llava.forward(model.params, cfg, inputs, last_position_only=True)  # no cache: not a prefill
