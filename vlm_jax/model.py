"""The user-facing model object: parameters + config + processor, and the checks that
turn bad inputs into clear errors before anything is compiled.

    model = vlm_jax.load("llava-hf/llava-1.5-7b-hf", dtype=jnp.bfloat16)
    batch = model.prepare("USER: <image>\\nWhat is this? ASSISTANT:", images=[img])
    out = model.run(batch, capture=("text.resid_post",))
    text = model.generate(batch, max_new_tokens=20).texts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import generate as gen
from vlm_jax.config import LlavaConfig
from vlm_jax.errors import InputError
from vlm_jax.inputs import Batch, Processor, as_numpy_inputs
from vlm_jax.interp.edits import AttentionEdit, Edits, stack_edits, validate_against_inputs
from vlm_jax.interp.sweep import first_edited_layers, shared_prefix_sweep
from vlm_jax.models import llava
from vlm_jax.nn.attention import resolve_fused
from vlm_jax.sharding import ShardingPlan, as_plan, mesh_context
from vlm_jax.weights import Layout


def check_inputs(arrays: Mapping[str, np.ndarray], cfg: LlavaConfig) -> None:
    """Raises InputError naming the problem and the fix for inputs the model cannot run."""
    ids = arrays["input_ids"]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be an integer array [batch, tokens]; got {ids.dtype} {ids.shape}.")
    vocab = cfg.text.vocab_size
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if bad.size:
        b, t = bad[0]
        raise InputError(
            f"token id {int(ids[b, t])} at input_ids[{b}, {t}] is outside the vocabulary [0, {vocab}) "
            f"({len(bad)} such position(s)). Fix: tokenize with this checkpoint's own processor/tokenizer."
        )
    for key in ("attention_mask", "position_ids"):
        if key in arrays and arrays[key].shape != ids.shape:
            raise InputError(f"{key} has shape {arrays[key].shape} but input_ids has {ids.shape}; they must match.")
    n_image_tokens = int(np.sum(ids == cfg.image_token_id))
    pixels = arrays.get("pixel_values")
    if pixels is None:
        if n_image_tokens:
            raise InputError(
                f"input_ids hold {n_image_tokens} image tokens (id {cfg.image_token_id}) but no pixel_values "
                "were given. Fix: pass the images to the processor together with the prompt."
            )
        return
    v = cfg.vision
    if pixels.ndim != 4 or pixels.shape[1] != v.num_channels:
        raise InputError(
            f"pixel_values must be [images, {v.num_channels}, height, width]; got shape {pixels.shape}. "
            "Fix: use the checkpoint's image processor (model.prepare or AutoProcessor)."
        )
    height, width = pixels.shape[2:]
    if v.family != "dinov2" and (height, width) != (v.image_size, v.image_size):
        raise InputError(
            f"pixel_values are {height}x{width} but this {v.family} tower takes {v.image_size}x{v.image_size} "
            "images. Fix: preprocess with the checkpoint's image processor (its crop size)."
        )
    if height < v.patch_size or width < v.patch_size:
        raise InputError(f"pixel_values {height}x{width} are smaller than one {v.patch_size}px patch.")
    per_image = cfg.image_tokens_per_image(height // v.patch_size, width // v.patch_size)
    if n_image_tokens != pixels.shape[0] * per_image:
        raise InputError(
            f"input_ids hold {n_image_tokens} image tokens but {pixels.shape[0]} image(s) need "
            f"{pixels.shape[0] * per_image} ({per_image} each): the number of <image> placeholders does "
            "not match the number of images. Fix: put one <image> in the prompt per image and let the "
            "processor expand it (model.prepare), or pass as many images as the prompts show."
        )


def _sweep(params, config, arrays, stacked, capture, fused, logit_positions, compute_logits):
    def one(edits):
        return llava.forward(params, config, arrays, capture=capture, edits=edits, fused_attention=fused,
                             logit_positions=logit_positions, compute_logits=compute_logits)

    return jax.vmap(one)(stacked)


_sweep_jit = jax.jit(_sweep, static_argnames=("config", "capture", "fused", "compute_logits"))


@dataclass
class Generation:
    tokens: np.ndarray  # [B, new tokens]
    texts: list[str] | None


class Model:
    """A LLaVA model: params (pytree), config (static), processor (may be None).

    With `sharding` (a vlm_jax.sharding.ShardingPlan) the params live split over its mesh,
    and every method places its inputs on the mesh and runs under it.
    """

    def __init__(self, params: dict, config: LlavaConfig, *, processor: Processor | None = None,
                 hf_config: dict | None = None, layout: Layout | None = None, source: str | None = None,
                 sharding: ShardingPlan | None = None):
        self.params = params
        self.config = config
        self.processor = processor
        self.hf_config = hf_config
        self.layout = layout or Layout.default(config)
        self.source = source
        self.sharding = as_plan(sharding)

    def shard(self, sharding) -> "Model":
        """This model with its parameters split over a mesh (ShardingPlan or Mesh)."""
        plan = as_plan(sharding)
        return Model(plan.shard_params(self.params, self.config), self.config, processor=self.processor,
                     hf_config=self.hf_config, layout=self.layout, source=self.source, sharding=plan)

    def mesh_context(self):
        """Context to trace and run this model's computations under (a no-op unsharded)."""
        return mesh_context(self.sharding)

    def place(self, arrays: Mapping[str, Any]) -> dict:
        """Input arrays on the model's devices: batch split over data x fsdp when sharded."""
        if self.sharding is None:
            return dict(arrays)
        return self.sharding.place_batch(arrays)

    def __repr__(self) -> str:
        v, t = self.config.vision, self.config.text
        return (f"Model({self.source or 'in memory'}: {v.model_type} {v.num_layers}x{v.hidden_size} -> "
                f"{t.model_type} {t.num_layers}x{t.hidden_size}, {self.num_params / 1e6:.1f}M params, {self.dtype})")

    @property
    def dtype(self):
        return self.params["language_model"]["embed_tokens"]["embedding"].dtype

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    # -- inputs --------------------------------------------------------------------------------
    def _need_processor(self) -> Processor:
        if self.processor is None:
            raise InputError(
                "this model has no processor (the checkpoint folder holds no tokenizer/processor files). "
                "Fix: load from a folder that has them, or pass input_ids/pixel_values arrays directly."
            )
        return self.processor

    def prepare(self, prompts: str | Sequence[str] | None = None, images: Any = None, *,
                conversation: Sequence[dict] | None = None, padding_side: str = "left") -> Batch:
        """A Batch from prompts (with <image> placeholders) or a chat conversation, and images."""
        processor = self._need_processor()
        if conversation is not None:
            prompts = processor.chat(conversation)
        if prompts is None:
            raise InputError("prepare() needs prompts or a conversation.")
        return processor(prompts, images, padding_side=padding_side)

    def _arrays(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = as_numpy_inputs(inputs)
        check_inputs(arrays, self.config)
        arrays["input_ids"] = arrays["input_ids"].astype(np.int32)
        for key in ("attention_mask", "position_ids"):
            if key in arrays:
                arrays[key] = arrays[key].astype(np.int32)
        if "pixel_values" in arrays:
            arrays["pixel_values"] = arrays["pixel_values"].astype(jnp.dtype(self.dtype))
        return arrays

    # -- running -------------------------------------------------------------------------------
    def edits(self) -> Edits:
        """An empty edit set for this model (add edits with its methods)."""
        return Edits(self.config)

    def _check_edits(self, edits: Edits | None, arrays: dict, fused_attention: bool | None) -> None:
        if edits is None:
            return
        if edits.config != self.config:
            raise ValueError("these edits were built for another model config; build them with model.edits()")
        pixels = arrays.get("pixel_values")
        images, vision_tokens = 0, 0
        if pixels is not None:
            p = self.config.vision.patch_size
            images = pixels.shape[0]
            vision_tokens = (pixels.shape[2] // p) * (pixels.shape[3] // p) + self.config.vision.num_prefix_tokens
        batch, tokens = arrays["input_ids"].shape
        validate_against_inputs(edits, batch, tokens, images, vision_tokens)
        if fused_attention and any(isinstance(op, AttentionEdit) for op in edits.ops):
            raise ValueError("attention-edge edits need the explicit attention path; "
                             "pass fused_attention=False (or None to choose automatically)")

    def run(self, inputs: Mapping[str, Any], *, capture: Sequence[str] = (), edits: Edits | None = None,
            fused_attention: bool | None = None, logit_positions: np.ndarray | None = None,
            compute_logits: bool = True) -> llava.Output:
        """Runs the model on processor-style arrays; logits [B, T, V] as transformers'.

        capture: site names (vlm_jax.interp.sites); edits: model.edits()...; fused_attention:
        None picks the fused kernel on accelerators wherever no pattern/edge edit needs the
        explicit path.
        """
        arrays = self._arrays(inputs)
        self._check_edits(edits, arrays, fused_attention)
        fused = resolve_fused(fused_attention)
        with self.mesh_context():
            return llava.forward_jit(
                self.params, self.config, self.place(arrays), capture=tuple(sorted(set(capture))), edits=edits,
                fused_attention=fused, compute_logits=compute_logits,
                logit_positions=None if logit_positions is None else jnp.asarray(logit_positions, jnp.int32),
            )

    def run_sweep(self, inputs: Mapping[str, Any], edit_sets: Sequence[Edits] | Edits, *,
                  capture: Sequence[str] = (), fused_attention: bool | None = None,
                  logit_positions: np.ndarray | None = None, compute_logits: bool = True) -> llava.Output:
        """Runs several edit sets on the same inputs in one vmapped, compiled call.

        edit_sets: a list of Edits with the same structure (e.g. one ablation per layer), or an
        already stacked Edits. Every output gains a leading sweep axis.
        """
        stacked = stack_edits(list(edit_sets)) if not isinstance(edit_sets, Edits) else edit_sets
        arrays = self._arrays(inputs)
        first = jax.tree.map(lambda x: x[0], stacked)
        self._check_edits(first, arrays, fused_attention)
        fused = resolve_fused(fused_attention)
        positions = None if logit_positions is None else jnp.asarray(logit_positions, jnp.int32)
        n_sets = jax.tree.leaves(stacked)[0].shape[0] if stacked.ops else 0
        starts = first_edited_layers(stacked, n_sets) if (stacked.ops and not capture and compute_logits) else None
        n_layers = self.config.text.num_layers
        arrays = self.place(arrays)
        with self.mesh_context():
            if starts is not None and sum(1 + sum(s <= j for s in starts) for j in range(n_layers)) < n_sets * n_layers:
                # every edit is in the text decoder: share the layers before each set's first edit
                logits = shared_prefix_sweep(self.params, self.config, arrays, stacked, starts, positions, fused)
                return llava.Output(logits=logits, acts={})
            return _sweep_jit(self.params, self.config, arrays, stacked, tuple(sorted(set(capture))), fused,
                              positions, compute_logits)

    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                 fused_attention: bool | None = None) -> Generation:
        """New tokens (and their text when a processor is present) for every prompt."""
        arrays = self._arrays(inputs)
        text = self.config.text
        eos = tuple(text.eos_token_ids) if eos_token_ids is None else tuple(eos_token_ids)
        pad = pad_token_id if pad_token_id is not None else text.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0  # transformers falls back to eos as pad
        with self.mesh_context():
            tokens = gen.generate(
                self.params, self.config, arrays, max_new_tokens, place=self.place,
                sampling=gen.Sampling(do_sample, temperature, top_k, top_p), eos_token_ids=eos, pad_token_id=pad,
                seed=seed, fused_attention=resolve_fused(fused_attention),
            )
        texts = self.processor.decode(tokens) if self.processor is not None else None
        return Generation(tokens, texts)

    # -- saving --------------------------------------------------------------------------------
    def save(self, out_dir: str, *, force: bool = False) -> str:
        """Writes a converted vlm_jax checkpoint (orbax params + config + processor files)."""
        from vlm_jax.checkpoint import save_converted

        return save_converted(self, out_dir, force=force)

    def export_hf(self, out_dir: str, *, force: bool = False, dtype=None, max_shard_bytes: int = 5 * 1024**3) -> str:
        """Writes a transformers folder (config.json, safetensors, processor files)."""
        from vlm_jax.checkpoint import export_hf

        return export_hf(self, out_dir, force=force, dtype=dtype, max_shard_bytes=max_shard_bytes)

    def astype(self, dtype) -> "Model":
        params = jax.tree.map(lambda x: x.astype(dtype), self.params)
        return Model(params, self.config, processor=self.processor, hf_config=self.hf_config,
                     layout=self.layout, source=self.source, sharding=self.sharding)
