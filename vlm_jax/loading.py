"""`vlm_jax.load`: a hub id, an HF folder or a converted checkpoint -> Model."""

from __future__ import annotations

import json
import logging
import os

from vlm_jax.checkpoint import is_converted, load_converted
from vlm_jax.config import from_hf_config
from vlm_jax.errors import VlmJaxError
from vlm_jax.inputs import Processor
from vlm_jax.model import Model
from vlm_jax.weights import load_hf_params

log = logging.getLogger(__name__)

# What a LLaVA checkpoint needs from the hub: config, weights, tokenizer and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def resolve_folder(source: str, revision: str | None = None) -> str:
    """A local folder for `source`: itself if it is a folder, else a hub download (or cache hit)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise VlmJaxError(f"{source} is a file; vlm_jax.load takes a checkpoint folder or a hub id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(repo_id=source, revision=revision, allow_patterns=HUB_PATTERNS)
    except HFValidationError:
        raise VlmJaxError(
            f"{source!r} is neither a local folder nor a valid hub id (like 'llava-hf/llava-1.5-7b-hf'). "
            "Fix: check the path."
        ) from None
    except Exception as e:  # network down, repo missing, gated, ...
        raise VlmJaxError(
            f"Could not get {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). Fix: check the "
            "id and your connection, log in for gated repos (huggingface-cli login), or download it "
            "once and pass the local folder (HF_HUB_OFFLINE=1 uses the cache)."
        ) from e


def load_processor(folder: str, config) -> Processor | None:
    if not any(os.path.exists(os.path.join(folder, name)) for name in PROCESSOR_FILES):
        return None
    try:
        return Processor.from_pretrained(folder, config)
    except Exception as e:  # the weights are still usable without it
        log.warning("could not load the processor in %s (%s: %s); model.prepare() will be unavailable",
                    folder, type(e).__name__, e)
        return None


def load(source: str, dtype=None, *, revision: str | None = None, progress: bool = True,
         sharding=None) -> Model:
    """Loads a LLaVA model.

    Args:
      source: a hub id ('llava-hf/llava-1.5-7b-hf'), a local transformers folder (single or
        sharded safetensors, either key layout), or a folder written by `vlm-jax convert`.
      dtype: parameter dtype, e.g. jnp.bfloat16 (None keeps the stored dtype).
      revision: hub revision (branch, tag or commit).
      sharding: a vlm_jax.sharding.ShardingPlan (or a jax Mesh with data/fsdp/tensor axes):
        every parameter is read straight into its shards on that mesh, and the returned
        model runs sharded.
    """
    from vlm_jax.sharding import as_plan

    plan = as_plan(sharding)
    folder = resolve_folder(str(source), revision)
    if is_converted(folder):
        params, cfg, hf_config, layout = load_converted(
            folder, dtype, shardings=None if plan is None else _converted_shardings(folder, plan))
    else:
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise VlmJaxError(
                f"{folder} has no config.json, so it is not a transformers checkpoint or a vlm_jax "
                "checkpoint. Fix: point to the folder that save_pretrained or `vlm-jax convert` wrote."
            )
        with open(config_path) as f:
            hf_config = json.load(f)
        cfg = from_hf_config(hf_config)
        params, layout = load_hf_params(folder, cfg, dtype, progress=progress,
                                        shardings=None if plan is None else plan.param_shardings(cfg))
    return Model(params, cfg, processor=load_processor(folder, cfg), hf_config=hf_config, layout=layout,
                 source=str(source), sharding=plan)


def _converted_shardings(folder: str, plan) -> dict:
    from vlm_jax.checkpoint import read_converted_config

    return plan.param_shardings(read_converted_config(folder))
