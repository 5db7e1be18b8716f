"""Training data: examples -> fixed-shape batches with the answer tokens marked.

An example is a mapping with "prompt" (text with one <image> per image, up to the point where
the answer starts), "images" (list of PIL images, may be empty) and "answer" (the text the
model should produce; an EOS token is appended by default). The loss covers the answer tokens
only. Batches are left-padded to a multiple of `token_bucket` and the answers to a multiple of
8, so a run compiles its step once per shape bucket.

The order of examples is a seeded permutation per epoch: step s always sees the same
examples, which is what makes a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from vlm_jax.inputs import answer_token_count, image_token_map


class DataError(ValueError):
    """An example the trainer cannot use."""


def epoch_order(n_examples: int, epoch: int, seed: int) -> np.ndarray:
    """The example order of one epoch (same seed and epoch -> same order)."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def batch_indices(n_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of global step `step` (0-based); epochs follow each other seamlessly."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise DataError(f"the dataset has {n_examples} examples, fewer than one batch of {batch_size}")
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(n_examples, epoch, seed)[offset * batch_size:(offset + 1) * batch_size]


@dataclass
class Collator:
    """Examples -> arrays: input_ids, attention_mask, pixel_values, and for the answer tokens
    target_positions [B, A] (their positions), target_ids [B, A], target_valid [B, A]."""

    model: object
    token_bucket: int = 64
    append_eos: bool = True

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
        processor = self.model.processor
        if processor is None:
            raise DataError("training needs the checkpoint's processor (tokenizer + image processor)")
        tok = processor.tokenizer
        eos = tok.eos_token if (self.append_eos and tok.eos_token) else ""
        texts, counts, images = [], [], []
        for i, ex in enumerate(examples):
            for key in ("prompt", "answer"):
                if not isinstance(ex.get(key), str):
                    raise DataError(f"example {i} needs a string {key!r}")
            answer = ex["answer"] + eos
            texts.append(ex["prompt"] + answer)
            counts.append(answer_token_count(tok, ex["prompt"], answer))
            images += list(ex.get("images") or [])
        batch = processor(texts, images or None, padding_side="left")
        width = -(-batch.input_ids.shape[1] // self.token_bucket) * self.token_bucket
        extra = width - batch.input_ids.shape[1]
        pad_id = self.model.config.text.pad_token_id or 0
        ids = np.pad(batch.input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(batch.attention_mask, ((0, 0), (extra, 0)))
        answer_width = -(-max(counts) // 8) * 8
        positions = np.zeros((len(texts), answer_width), np.int32)
        valid = np.zeros((len(texts), answer_width), bool)
        for row, n in enumerate(counts):
            if n < 1 or n >= mask[row].sum():
                raise DataError(f"example {row}: the answer has {n} tokens; it needs at least one, after the prompt")
            positions[row, :n] = np.arange(width - n, width)
            positions[row, n:] = width - 1
            valid[row, :n] = True
        image_map = image_token_map(ids, self.model.config, batch.image_tokens.grid if batch.image_tokens else None)
        if (image_map.image_index[np.arange(len(texts))[:, None], positions] >= 0).any():
            raise DataError("an answer contains <image> tokens; put the images in the prompt")
        out = {
            "input_ids": ids.astype(np.int32),
            "attention_mask": mask.astype(np.int32),
            "target_positions": positions,
            "target_ids": np.take_along_axis(ids, positions, axis=1).astype(np.int32),
            "target_valid": valid,
        }
        if batch.pixel_values is not None:
            out["pixel_values"] = batch.pixel_values.astype(np.float32)
        return out
