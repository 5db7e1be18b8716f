"""Logit lens: the model's own final norm and unembedding applied to intermediate states.

`logit_lens` maps residual states [L, B, T, D] (or any [L, ..., D]) to top-k tokens and
probabilities and to the rank and probability of target tokens, in one compiled call that
never materialises [L, B, T, V]: layers are visited one at a time (lax.map) and positions in
chunks, so memory is one chunk's logits (on CPU in float32 each chunk's log-sum-exp and block
maxima come from one pass of a C++ kernel, interp/lens_kernel.py). Study A's region metric
(top-1 token sets per region, mean pairwise Jaccard per layer, with filter lists) works on its
output.
"""

from __future__ import annotations

import functools
from itertools import combinations
from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import LlavaConfig
from vlm_jax.interp import lens_kernel
from vlm_jax.models import text_decoder

COLOR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
               "grey", "cyan", "magenta", "violet", "gold", "silver")
OPTION_LETTERS = ("A", "B", "C", "D", "E")


@flax.struct.dataclass
class LensResult:
    """top_ids, top_probs: [L, ..., k]. With targets [n, S] (token ids, -1 padded):
    first_rank/first_prob [L, ..., n] for each target's first sub-token, best_rank/best_prob the
    best over its sub-tokens (rank 0 = the top token)."""

    top_ids: jax.Array
    top_probs: jax.Array
    first_rank: jax.Array | None = None
    first_prob: jax.Array | None = None
    best_rank: jax.Array | None = None
    best_prob: jax.Array | None = None


def lens_logits(params: dict, config: LlavaConfig, h: jax.Array) -> jax.Array:
    """Logits [..., V] of residual states h [..., D] (final norm, then unembedding)."""
    lm = params["language_model"]
    return text_decoder.unembed(lm, params.get("lm_head"), text_decoder.final_norm(lm, config.text, h))


def _block_size(vocab: int, k: int) -> int | None:
    """A divisor of the vocabulary near 64 for block_top_k, or None (plain top_k is as good)."""
    if vocab < 4096:
        return None
    for step in range(0, 64):
        for b in (64 + step, 64 - step):
            if 16 <= b and vocab % b == 0 and vocab // b >= k:
                return b
    return None


def block_top_k(logits: jax.Array, k: int, block: int, block_max: jax.Array | None = None):
    """Exact top-k over the last axis, via the top-k blocks of `block` entries by block max
    (`block_max` [n, vocab / block] if already computed).

    Every one of the k largest entries lies in a block whose max is among the k largest block
    maxima, so the answer is the top-k of those k blocks' entries. On CPU this is ~5x cheaper
    than lax.top_k over a 32k vocabulary (one max pass instead of a sort-like selection).
    Entries tied at the k-th value may be ordered differently than lax.top_k orders them.
    """
    n, vocab = logits.shape
    blocks = logits.reshape(n, vocab // block, block)
    if block_max is None:
        block_max = jnp.max(blocks, axis=-1)
    _, block_ids = jax.lax.top_k(block_max, k)  # [n, k]
    candidates = jnp.take_along_axis(blocks, block_ids[:, :, None], axis=1).reshape(n, k * block)
    values, where = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(block_ids, where // block, axis=1) * block + where % block
    return values, ids


def _one_chunk(params, config, h, k, targets):
    """h [C, D] -> top-k and target statistics for C positions."""
    logits = lens_logits(params, config, h).astype(jnp.float32)  # [C, V]
    block = _block_size(logits.shape[-1], k)
    if block and lens_kernel.usable(logits.dtype, block):  # CPU: block maxima and lse in one pass
        block_max, lse = lens_kernel.logit_stats(logits, block)
        lse = lse[:, None]
        top_logits, top_ids = block_top_k(logits, k, block, block_max)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        top_logits, top_ids = block_top_k(logits, k, block) if block else jax.lax.top_k(logits, k)
    out = [top_ids.astype(jnp.int32), jnp.exp(top_logits - lse)]
    if targets is not None:
        valid = targets >= 0  # [n, S]
        target_logits = jnp.take(logits, jnp.maximum(targets, 0).reshape(-1), axis=-1)  # [C, n*S]
        ranks = jnp.sum(logits[:, None, :] > target_logits[:, :, None], axis=-1).reshape(-1, *targets.shape)
        probs = jnp.exp(target_logits - lse).reshape(-1, *targets.shape)
        big = jnp.iinfo(jnp.int32).max
        out += [ranks[..., 0], probs[..., 0], jnp.min(jnp.where(valid, ranks, big), axis=-1),
                jnp.max(jnp.where(valid, probs, 0.0), axis=-1)]
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("config", "k", "chunk"))
def _lens(params, config, resid, targets, k, chunk):
    n_layers, d = resid.shape[0], resid.shape[-1]
    lead = resid.shape[1:-1]
    flat = resid.reshape(n_layers, -1, d)
    n = flat.shape[1]
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    flat = jnp.pad(flat, ((0, 0), (0, n_chunks * chunk - n), (0, 0)))
    chunks = flat.reshape(n_layers * n_chunks, chunk, d)
    outs = jax.lax.map(lambda h: _one_chunk(params, config, h, k, targets), chunks)
    return tuple(o.reshape(n_layers, n_chunks * chunk, *o.shape[2:])[:, :n].reshape(n_layers, *lead, *o.shape[2:])
                 for o in outs)


def logit_lens(params: dict, config: LlavaConfig, resid: jax.Array, *, k: int = 5,
               targets: Sequence[Sequence[int]] | np.ndarray | None = None, chunk: int = 576) -> LensResult:
    """Logit lens statistics for residual states resid [L, ..., D].

    Args:
      k: how many top tokens to return per position.
      targets: token ids of labels to rank, [n] (one token each) or [n, S] padded with -1 for
        multi-token labels (e.g. from `label_token_ids`).
      chunk: positions per unembedding call (memory: chunk x V float32 logits).
    """
    t = None
    if targets is not None:
        t = np.asarray(targets)
        t = jnp.asarray(t[:, None] if t.ndim == 1 else t, jnp.int32)
    outs = _lens(params, config, jnp.asarray(resid), t, k, chunk)
    return LensResult(*outs)


def stack_residuals(acts: dict) -> jax.Array:
    """[L + 1, B, T, D]: text.embed (layer 0) followed by text.resid_post (layers 1..L)."""
    return jnp.concatenate([acts["text.embed"][None], acts["text.resid_post"]], axis=0)


def gather_positions(resid: jax.Array, positions: np.ndarray) -> jax.Array:
    """resid [L, B, T, D] at positions [B, P] -> [L, B, P, D]."""
    idx = jnp.asarray(positions)[None, :, :, None]
    return jnp.take_along_axis(resid, idx, axis=2)


# ---------------------------------------------------------------------------------------------
# tokens <-> strings


def label_token_ids(tokenizer, labels: Sequence[str], *, leading_space: bool = True) -> np.ndarray:
    """[n, S] token ids of each label (no special tokens), -1 padded. With leading_space the
    label is tokenised as it appears after a space in running text (' cat')."""
    rows = []
    for label in labels:
        text = (" " + label) if leading_space else label
        ids = tokenizer.encode(text, add_special_tokens=False)
        if leading_space and not ids:
            ids = tokenizer.encode(label, add_special_tokens=False)
        rows.append(ids)
    width = max(len(r) for r in rows)
    return np.array([r + [-1] * (width - len(r)) for r in rows], np.int32)


def decode_ids(tokenizer, ids) -> np.ndarray:
    """Token ids (any shape) -> array of their strings (stripped of word-boundary markers)."""
    ids = np.asarray(ids)
    unique = np.unique(ids)
    table = {int(i): tokenizer.decode([int(i)]).strip() for i in unique}
    return np.vectorize(lambda i: table[int(i)], otypes=[object])(ids)


def ids_for_words(tokenizer, words: Iterable[str]) -> set[int]:
    """Token ids that spell any of `words` as a whole token (any case, with or without a
    leading space): the filter lists of study A (colour words, option letters)."""
    out: set[int] = set()
    unknown = getattr(tokenizer, "unk_token_id", None)
    for word in words:
        for variant in {word, word.lower(), word.capitalize(), word.upper()}:
            for text in (variant, " " + variant):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1 and ids[0] != unknown:
                    out.add(int(ids[0]))
    return out


# ---------------------------------------------------------------------------------------------
# study A: distinctness of the regions' top-1 tokens


def region_token_sets(top1: np.ndarray, regions: Sequence[np.ndarray], ignore_ids: Iterable[int] = ()) -> list:
    """Per layer, the set of top-1 token ids over each region's positions.

    top1 [L, T] (one example), regions: position index arrays into T. Returns
    [[set per region] per layer].
    """
    ignore = set(int(i) for i in ignore_ids)
    top1 = np.asarray(top1)
    return [[set(int(t) for t in top1[layer, np.asarray(r)]) - ignore for r in regions]
            for layer in range(top1.shape[0])]


def jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def mean_pairwise_jaccard(top1: np.ndarray, regions: Sequence[np.ndarray], ignore_ids: Iterable[int] = ()) -> np.ndarray:
    """[L] mean Jaccard overlap over all region pairs of their top-1 token sets (lower = more
    distinct decoded content)."""
    sets = region_token_sets(top1, regions, ignore_ids)
    return np.array([np.mean([jaccard(a, b) for a, b in combinations(layer_sets, 2)]) for layer_sets in sets])
