"""Model inputs: the checkpoint's own transformers processor, plus the image-token map.

The processor (AutoProcessor) does the chat template, tokenisation and image preprocessing;
this module only turns its output into numpy arrays and adds where each image's tokens are:
for every position, which image it shows (index into pixel_values) and which patch of that
image's grid (row, col), or -1 for text, class-token and register positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vlm_jax.config import LlavaConfig
from vlm_jax.errors import InputError

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "position_ids")


@dataclass(frozen=True)
class ImageTokenMap:
    """Where the image tokens are. All arrays [B, T] int32, -1 where not applicable.

    image_index: index into pixel_values of the image a position shows.
    token_index: index of the position within its image's tokens (0 .. tokens_per_image-1).
    patch_row, patch_col: the patch a position shows (-1 for class token / registers).
    grid: (rows, cols) of the patch grid.
    """

    image_index: np.ndarray
    token_index: np.ndarray
    patch_row: np.ndarray
    patch_col: np.ndarray
    grid: tuple[int, int]

    @property
    def image_mask(self) -> np.ndarray:
        """[B, T] bool: positions holding image features."""
        return self.image_index >= 0

    @property
    def patch_mask(self) -> np.ndarray:
        """[B, T] bool: positions holding a patch (not a class/register token)."""
        return self.patch_row >= 0

    def spans(self) -> list[tuple[int, int, int, int]]:
        """(batch row, image index, first position, end position) of every image."""
        out = []
        for b, t in zip(*np.nonzero(self.token_index == 0)):
            img = int(self.image_index[b, t])
            end = t + int(np.sum(self.image_index[b] == img))
            out.append((int(b), img, int(t), int(end)))
        return out

    def positions_of(self, image: int) -> tuple[int, np.ndarray]:
        """(batch row, positions [tokens_per_image]) of image `image`."""
        rows, cols = np.nonzero(self.image_index == image)
        if rows.size == 0:
            raise IndexError(f"image {image} does not appear in this batch")
        return int(rows[0]), cols

    def grid_positions(self, image: int) -> tuple[int, np.ndarray]:
        """(batch row, positions [rows, cols]) of image `image`'s patches, in grid layout."""
        row, cols = self.positions_of(image)
        patches = cols[self.patch_row[row, cols] >= 0]
        return row, patches.reshape(self.grid)


def image_token_map(input_ids: np.ndarray, cfg: LlavaConfig, grid: tuple[int, int] | None = None) -> ImageTokenMap:
    """The ImageTokenMap of a batch of token ids (images are numbered in reading order).

    grid defaults to the config's patch grid; pass (H // patch, W // patch) for DINOv2 towers
    run at another resolution.
    """
    input_ids = np.asarray(input_ids)
    grid = grid or (cfg.vision.grid_size, cfg.vision.grid_size)
    per_image = cfg.image_tokens_per_image(*grid)
    is_image = input_ids == cfg.image_token_id
    order = np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    image_index = np.where(is_image, order // per_image, -1).astype(np.int32)
    token_index = np.where(is_image, order % per_image, -1).astype(np.int32)
    # token k of an image is vision-sequence entry k (+1 when "default" dropped the first)
    seq_index = token_index + (1 if cfg.vision_feature_select_strategy == "default" else 0)
    patch = seq_index - cfg.vision.num_prefix_tokens
    is_patch = is_image & (patch >= 0)
    patch_row = np.where(is_patch, patch // grid[1], -1).astype(np.int32)
    patch_col = np.where(is_patch, patch % grid[1], -1).astype(np.int32)
    return ImageTokenMap(image_index, token_index, patch_row, patch_col, tuple(grid))


@dataclass
class Batch(Mapping):
    """Model-ready numpy arrays (a Mapping, so `model.run(batch)` and `**batch` work).

    input_ids [B, T], attention_mask [B, T], pixel_values [N, C, H, W] or None,
    image_tokens: ImageTokenMap.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    image_tokens: ImageTokenMap | None = None
    extras: dict = field(default_factory=dict)

    def _arrays(self) -> dict:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        return out

    def __getitem__(self, key: str) -> Any:
        return self._arrays()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays())

    def __len__(self) -> int:
        return len(self._arrays())

    @property
    def image_mask(self) -> np.ndarray:
        """[B, T] bool: image-token positions."""
        return self.image_tokens.image_mask if self.image_tokens else np.zeros_like(self.input_ids, bool)

    @property
    def text_mask(self) -> np.ndarray:
        """[B, T] bool: real (non-padding) text positions."""
        return self.attention_mask.astype(bool) & ~self.image_mask

    @property
    def last_positions(self) -> np.ndarray:
        """[B] index of each row's last real token (where the next token is predicted)."""
        t = self.attention_mask.shape[1]
        reversed_first = np.argmax(self.attention_mask[:, ::-1] > 0, axis=1)
        return (t - 1 - reversed_first).astype(np.int32)


def answer_token_count(tokenizer, prompt: str, answer: str) -> int:
    """How many tokens `answer` adds after `prompt` (it may merge with the prompt's last token
    in some tokenizers: then the answer's own tokens are counted)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    joint = tokenizer.encode(prompt + answer, add_special_tokens=True)
    n = len(joint) - len(prompt_ids)
    if n <= 0 or joint[: len(prompt_ids)] != prompt_ids:
        n = len(tokenizer.encode(answer, add_special_tokens=False))
    return n


def as_numpy_inputs(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's arrays from a processor output, a Batch or a dict (torch tensors too)."""
    out = {}
    for key in MODEL_KEYS:
        value = inputs.get(key) if hasattr(inputs, "get") else None
        if value is None:
            continue
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    if "input_ids" not in out:
        raise InputError("inputs have no 'input_ids'. Fix: pass the processor's output or model.prepare(...).")
    return out


class Processor:
    """The checkpoint's transformers processor, returning numpy Batches."""

    def __init__(self, hf_processor, config: LlavaConfig):
        self.hf = hf_processor
        self.config = config

    @classmethod
    def from_pretrained(cls, folder: str, config: LlavaConfig) -> "Processor":
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(folder), config)

    @property
    def tokenizer(self):
        return self.hf.tokenizer

    def chat(self, conversation: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for a chat conversation (the checkpoint's chat template)."""
        return self.hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)

    def __call__(
        self,
        prompts: str | Sequence[str],
        images: Any = None,
        *,
        padding_side: str = "left",
    ) -> Batch:
        """Tokenises prompts (each with one <image> per image it shows) and preprocesses images.

        images: a PIL image / array, or a list of them in the order the prompts show them.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        out = self.hf(
            images=images, text=list(prompts), return_tensors="np", padding=True, padding_side=padding_side
        )
        return self.batch_from_arrays(out)

    def batch_from_arrays(self, arrays: Mapping[str, Any]) -> Batch:
        arrays = as_numpy_inputs(arrays)
        ids = arrays["input_ids"].astype(np.int32)
        mask = arrays.get("attention_mask", np.ones_like(ids)).astype(np.int32)
        pixels = arrays.get("pixel_values")
        grid = None
        if pixels is not None:
            p = self.config.vision.patch_size
            grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        return Batch(ids, mask, pixels, image_token_map(ids, self.config, grid))

    def decode(self, token_ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(np.asarray(token_ids), skip_special_tokens=skip_special_tokens)
