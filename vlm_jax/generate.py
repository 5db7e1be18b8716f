"""Decoding with a key/value cache, compiled once per length bucket.

The prompt is left-aligned and left-padded to a bucket (prompt_width: a multiple of ~1/16 of its
length, or of `prompt_bucket`), the cache holds bucket + new-token slots, and the whole decode
loop is one lax.while_loop inside one jit: image features are computed once at prefill, no step
goes back to Python, and prompts of similar length share a compiled program. Greedy decoding
reproduces transformers' generate() token for token (pad_token_id after EOS, as it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import LlavaConfig
from vlm_jax.multihost import to_host
from vlm_jax.models import llava, text_decoder
from vlm_jax.nn import decode_matmul


@dataclass(frozen=True)
class Sampling:
    """Greedy when do_sample is False; otherwise temperature -> top-k -> top-p, as transformers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off


def greedy_token(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, axis=-1) as int32 [B] for logits [B, V]: the first index of the maximum,
    or of the first NaN. Computed as a max, then the least index that holds it: two plain
    reductions, where XLA CPU's argmax (one reduction over value-index pairs) took 580 us for 4 x
    32064 logits against 105 us, ~7% of a batch-4 decode step on the CPU preset."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if any logit is NaN
    hit = (logits == top) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def choose_token(logits: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """Next token [B] from logits [B, V]."""
    logits = logits.astype(jnp.float32)
    if not sampling.do_sample:
        return greedy_token(logits)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= (1 - sampling.top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)  # always keep the most likely
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode_params(params: dict, kernels: str | None) -> dict:
    """The parameters the decode loop reads. Every decode step reads all decoder weights. With
    `kernels` (decode_kernel_form) the CPU kernels of nn/decode_matmul.py read them at memory
    speed: in place in their stack ("stacked"), or packed once into column panels ("packed").
    Otherwise per-layer copies made once here spare the steps a copy of each layer's weights out
    of the stack (see layers.unrolled_layers)."""
    if kernels is None:
        decoder = text_decoder.unstack_layers(params["language_model"])
    else:
        decoder, lm_head = text_decoder.decode_kernels(params["language_model"], params.get("lm_head"), kernels)
        if lm_head is not None:
            params = {**params, "lm_head": lm_head}
    return {**params, "language_model": decoder}


def decode_forward(params: dict, config: LlavaConfig, token: jax.Array, position: jax.Array, cache: tuple,
                   slot: jax.Array, key_valid: jax.Array, fused: bool = False):
    """The forward pass of one decode step (the body of generate's loop): token [B] at rotary
    position [B], written at cache slot `slot` of the per-layer caches; key_valid [B, S] marks
    the valid slots, this one included. Returns (logits [B, V], the updated caches)."""
    inputs = {"input_ids": token[:, None], "position_ids": position[:, None]}
    out = llava.forward(params, config, inputs, cache=cache, cache_index=slot, key_valid=key_valid,
                        fused_attention=fused)
    return out.logits[:, -1], out.cache


def prefill(params: dict, config: LlavaConfig, input_ids, attention_mask, pixel_values, fused: bool = False):
    """generate's prefill of left-aligned prompts input_ids / attention_mask [B, T] (pad_prompts):
    the first new token's logits [B, V] and the stacked cache of the prompt's T slots.

    It runs the stacked layers in one lax.scan, filling a stacked cache: faster than unrolled
    layers on per-layer copies (prefill + first token of the CPU preset 0.340 -> 0.305 s at batch
    1, 1.214 -> 1.146 s at batch 4). Prompts are left-aligned, so the next token needs the last
    position only, which is all the last layer computes beyond the cache's keys and values
    (last_position_only)."""
    batch, prompt_len = input_ids.shape
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": llava.default_positions(attention_mask)}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    dtype = params["language_model"]["embed_tokens"]["embedding"].dtype
    cache = text_decoder.init_cache(config.text, batch, prompt_len, dtype)
    out = llava.forward(params, config, inputs, cache=cache, cache_index=0, key_valid=attention_mask.astype(bool),
                        last_position_only=True, fused_attention=fused)
    return out.logits[:, -1], out.cache


def _generate(params, config: LlavaConfig, input_ids, attention_mask, pixel_values, rng, max_new_tokens,
              *, new_slots: int, sampling: Sampling, eos_ids: tuple, pad_id: int, fused: bool,
              kernels: str | None = None):
    batch, prompt_len = input_ids.shape
    first_logits, prompt_cache = prefill(params, config, input_ids, attention_mask, pixel_values, fused)
    # The decode loop reads per-layer weights (decode_params) and per-layer caches, with the new
    # tokens' slots after the prompt's.
    params = decode_params(params, kernels)
    cache = text_decoder.split_cache(prompt_cache, new_slots)
    key_valid = jnp.concatenate([attention_mask.astype(bool), jnp.zeros((batch, new_slots), bool)], axis=1)
    rng, sub = jax.random.split(rng)
    token = choose_token(first_logits, sampling, sub)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def emit(tokens, token, done, step):
        """Writes `token` as new token `step` (pad after a row's EOS); returns (tokens, the token
        written, done)."""
        token = jnp.where(done, pad_id, token)
        return tokens.at[:, step].set(token), token, done | jnp.isin(token, eos)

    # Each step emits the token in hand and runs the forward for the next one; the last token is
    # emitted after the loop, so no forward runs for a token that would never be used.
    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(state):
        step, tokens, token, cache, key_valid, done, position, rng = state
        tokens, token, done = emit(tokens, token, done, step)
        slot = prompt_len + step
        key_valid = key_valid.at[:, slot].set(True)
        position = position + 1
        logits, cache = decode_forward(params, config, token, position, cache, slot, key_valid, fused)
        rng, sub = jax.random.split(rng)
        next_token = choose_token(logits, sampling, sub)
        return step + 1, tokens, next_token, cache, key_valid, done, position, rng

    tokens = jnp.full((batch, new_slots), pad_id, jnp.int32)
    last_position = llava.default_positions(attention_mask)[:, -1]  # the prefill's (XLA computes it once)
    state = (jnp.int32(0), tokens, token, cache, key_valid, jnp.zeros((batch,), bool), last_position, rng)
    step, tokens, token, _, _, done, _, _ = jax.lax.while_loop(cond, body, state)
    tokens, _, _ = emit(tokens, token, done, step)  # the last token (a pad once every row has stopped)
    return tokens, step


_STATIC = ("config", "new_slots", "sampling", "eos_ids", "pad_id", "fused", "kernels")
_generate_jit = jax.jit(_generate, static_argnames=_STATIC)
# On CPU, XLA hands dots to YNNPACK by default, which runs the decode steps' skinny products
# ([B, D] x [D, F] with B of a few rows) far below memory speed (the unembedding at B=4: 8.8
# vs 2.6 ms at B=1). Keeping only YNNPACK's reductions makes them XLA's own dots: a decode step
# at B=4 went from ~31 to ~26 ms (measured while developing; benchmarks/RESULTS.md).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
_generate_jit_cpu = jax.jit(_generate, static_argnames=_STATIC, compiler_options=_CPU_OPTIONS)


def _devices(params: dict) -> set:
    return jax.tree.leaves(params)[0].devices()


def _on_one_cpu(params: dict) -> bool:
    devices = _devices(params)
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def compiler_options(params: dict) -> dict | None:
    """The XLA compiler options generate's program is compiled with for these parameters
    (_CPU_OPTIONS on CPU, none elsewhere)."""
    return _CPU_OPTIONS if next(iter(_devices(params))).platform == "cpu" else None


def compiled_generate(params: dict):
    """The jitted decoding function `generate` runs for these parameters (CPU or not)."""
    return _generate_jit_cpu if compiler_options(params) is not None else _generate_jit


# Packing the weights into panels costs about as much per generate call as the panels then save
# in ~70 decode steps at 3-4 rows (CPU preset, batch 4: stacked 1.286 against packed 1.311 s for
# 32 new tokens, 2.503 against 2.469 s for 128); at 5-8 rows they save several times more per step.
PACKED_FROM_TOKENS = 72


def decode_kernel_form(params: dict, batch: int, new_tokens: int | None = None) -> str | None:
    """How the decode steps multiply with the weights: in the CPU kernels of nn/decode_matmul.py
    for 1-8 rows of float32 parameters on one CPU device, where XLA's products read the weights
    at about half the memory speed for 2-8 rows, and generate had to copy them out of their stack
    first. "stacked" reads the stacked weights in place; "packed" copies them once per call into
    column panels, which that kernel reads faster and more steadily for more rows (at 4 rows
    the stacked form swung between level and 12% slower per step). So, with AVX2 kernels: stacked
    for 1-2 rows, and for 3-4 rows unless `new_tokens` (None: unknown) reaches PACKED_FROM_TOKENS,
    which repays the copy; packed for 5-8 rows. With AVX-512 kernels (decode_matmul.vector_lanes()
    16) the stacked kernel keeps its accumulators in registers and is as fast as the panels for
    1-8 rows: stacked always. None: XLA's products on per-layer copies (more rows, other devices,
    sharded or non-float32 parameters; the kernels are not partitioned). Chosen by timing
    generate on the CPU preset (benchmarks/RESULTS.md)."""
    text = params["language_model"]["embed_tokens"]["embedding"]
    if not (1 <= batch <= decode_matmul.MAX_ROWS and text.dtype == jnp.float32 and _on_one_cpu(params)
            and decode_matmul.available()):
        return None
    if decode_matmul.vector_lanes() >= 16 or batch <= 2 or (
            batch <= 4 and new_tokens is not None and new_tokens < PACKED_FROM_TOKENS):
        return "stacked"
    return "packed"


def decode_program_text(params: dict, config: LlavaConfig, input_ids, attention_mask, pixel_values,
                        new_slots: int, fused: bool = False) -> str:
    """XLA's compiled program (HLO text) of greedy decoding for these shapes: the program
    `generate` runs for left-aligned input_ids / attention_mask [B, T] and pixel_values, with
    `new_slots` cache slots after the prompt. For inspecting what the compiler made of the decode
    loop (copies of the cache, collectives under a mesh); nothing is run."""
    lowered = compiled_generate(params).lower(
        params, config, input_ids, attention_mask, pixel_values, jax.random.key(0), jnp.int32(new_slots),
        new_slots=new_slots, sampling=Sampling(), eos_ids=(), pad_id=0, fused=fused,
        kernels=decode_kernel_form(params, input_ids.shape[0], new_slots))
    return lowered.compile().as_text()


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int):
    """Moves every row's real tokens to the right end (right padding becomes left padding)."""
    ids = np.full_like(input_ids, pad_id)
    mask = np.zeros_like(attention_mask)
    for b in range(input_ids.shape[0]):
        real = attention_mask[b] > 0
        n = int(real.sum())
        if n:
            ids[b, -n:] = input_ids[b, real]
            mask[b, -n:] = 1
    return ids, mask


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_width(length: int, prompt_bucket: int | None = None) -> int:
    """The width a prompt of `length` tokens is left-padded to: a multiple of `prompt_bucket`, or
    by default of 1/16 of the largest power of two <= length (at least 16). The padding then costs
    at most ~6% of the prefill at any length (a fixed multiple of 64 cost 6.5% of a 601-token
    prompt, whose prefill is most of a short generation), for 16 compiled programs per doubling of
    the length (a LLaVA prompt of 576 image tokens and 25-64 words of text: 601-640 -> 608, 640
    or, past 640, multiples of 32)."""
    if prompt_bucket is None:
        prompt_bucket = max(16, (1 << (max(length, 1).bit_length() - 1)) // 16)
    return round_up(length, prompt_bucket)


def pad_prompts(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int, prompt_bucket: int | None = None):
    """The prompts as generate runs them: left-aligned (left_align) and left-padded to
    prompt_width. Returns (input_ids, attention_mask), int32 [B, width]."""
    ids, mask = left_align(np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32), pad_id)
    pad = prompt_width(ids.shape[1], prompt_bucket) - ids.shape[1]
    return np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (pad, 0)))


def generate(
    params: dict,
    config: LlavaConfig,
    inputs: Mapping[str, np.ndarray],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    seed: int = 0,
    prompt_bucket: int | None = None,
    new_token_bucket: int = 64,
    fused_attention: bool = False,
    place: Callable[[dict], dict] | None = None,
) -> np.ndarray:
    """New tokens [B, max_new_tokens] (pad_token_id after a row's EOS).

    inputs: numpy input_ids [B, T], attention_mask [B, T] (left or right padded),
    pixel_values [N, C, H, W] or absent (host arrays: they are realigned and padded here).
    prompt_bucket: prompts are left-padded to a multiple of it (None: prompt_width's default,
    a multiple of ~1/16 of the length); each width is its own compiled program.
    place: puts the padded arrays on the devices (Model.place: batch split over the mesh);
    None leaves that to jit. The tokens come back whole on every process, also when the batch
    is split over several hosts.
    """
    ids = np.asarray(inputs["input_ids"], np.int32)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if max_new_tokens == 0:
        return np.zeros((ids.shape[0], 0), np.int32)
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), np.int32)
    ids, mask = pad_prompts(ids, mask, pad_token_id, prompt_bucket)
    arrays = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs.get("pixel_values")}
    if place is not None:
        arrays = place(arrays)
    tokens, steps = compiled_generate(params)(
        params, config, arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], jax.random.key(seed),
        jnp.int32(max_new_tokens),
        new_slots=round_up(max_new_tokens, new_token_bucket), sampling=sampling,
        eos_ids=tuple(int(e) for e in eos_token_ids), pad_id=int(pad_token_id), fused=fused_attention,
        kernels=decode_kernel_form(params, ids.shape[0], max_new_tokens),
    )
    return to_host(tokens)[:, :max_new_tokens]
