"""Which parameters train: named components, path prefixes, LoRA adapters or a soft prompt.

The parameter tree splits into a trainable dict {path: leaf} (kept in float32, with optimizer
state) and the frozen rest (no optimizer state, never written). `merge` puts them back
together for the forward pass.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vlm_jax.models import params as P
from vlm_jax.train.lora import UnknownParametersError

COMPONENTS = {
    "all": ((),),
    "vision_tower": (("vision_tower",),),
    "projector": (("multi_modal_projector",),),
    "text_decoder": (("language_model",), ("lm_head",)),
}
SOFT_PROMPT = ("soft_prompt",)


def select(params: dict, trainable: str | Sequence[str]) -> list[tuple]:
    """Trainable parameter paths for a component name ('all', 'vision_tower', 'projector',
    'text_decoder') or a list of dotted path prefixes ('language_model.layers.mlp')."""
    names = [trainable] if isinstance(trainable, str) else list(trainable)
    flat = P.flatten(params)
    chosen: list[tuple] = []
    for name in names:
        prefixes = COMPONENTS.get(name, (tuple(name.split(".")),))
        hits = [path for path in flat for prefix in prefixes if path[: len(prefix)] == prefix]
        if not hits:
            examples = sorted({".".join(p[:2]) for p in flat})[:12]
            raise UnknownParametersError(
                f"no parameters match {name!r}. Use one of {sorted(COMPONENTS)} or a dotted prefix of a "
                f"parameter path, e.g. {', '.join(examples)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def key(path: tuple) -> str:
    return "/".join(path)


def split(params: dict, trainable_paths: Sequence[tuple]) -> tuple[dict, dict]:
    """(trainable {"a/b/c": float32 leaf}, frozen {path: leaf})."""
    flat = P.flatten(params)
    wanted = set(trainable_paths)
    # copies: the training step donates its state, which must never alias the model's arrays
    trainable = {key(p): jnp.array(v, dtype=jnp.float32, copy=True) for p, v in flat.items() if p in wanted}
    frozen = {p: v for p, v in flat.items() if p not in wanted}
    return trainable, frozen


def merge(trainable: dict, frozen: dict, dtype) -> dict:
    """The full parameter tree, trainable leaves cast to the compute dtype."""
    return P.unflatten({**frozen, **{tuple(k.split("/")): v.astype(dtype) for k, v in trainable.items()}})


def count(tree: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
