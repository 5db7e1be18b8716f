"""Converted vlm_jax checkpoints (orbax) and export back to transformers folders.

A converted checkpoint is a folder:

    vlm_jax.json     format version, our config, the HF config.json dict, key layout, dtype
    params/          orbax checkpoint of the parameter tree (stacked layers, our layouts)
    config.json      the HF config (so AutoProcessor/AutoConfig work on the folder)
    tokenizer*, processor_config.json, chat_template.*   the transformers processor

Every folder this module writes is assembled under a hidden temporary name beside the target
and renamed into place at the end: a failure or a kill leaves no partial folder, and an
existing folder is replaced only with force=True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp

from vlm_jax.config import config_from_dict, config_to_dict, to_hf_config
from vlm_jax.errors import CheckpointMismatchError, OutputExistsError
from vlm_jax.models import llava
from vlm_jax.multihost import is_writer
from vlm_jax.weights import Layout, hf_tensors, write_safetensors

FORMAT_FILE = "vlm_jax.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False):
    """Yields a temporary folder that becomes `out_dir` only if the block succeeds."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out} already exists. Fix: choose another output folder, or pass --force "
            "(force=True) to replace it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checkpointer(restore_bytes: int | None = None):
    """Orbax PyTree checkpointer without compression (weights barely compress; skipping zstd
    restores about 2x faster). restore_bytes caps the bytes read concurrently, which bounds
    the host memory a restore needs beyond the parameters themselves."""
    import orbax.checkpoint as ocp

    gb = None if restore_bytes is None else max(0.25, 1.01 * restore_bytes / 1e9)
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, restore_concurrent_gb=gb))


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _hf_config_for(model, dtype) -> dict:
    hf = dict(model.hf_config) if model.hf_config else to_hf_config(model.config)
    hf["dtype"] = _dtype_name(dtype)  # transformers >= 5; older ones read torch_dtype
    if "torch_dtype" in hf:
        hf["torch_dtype"] = hf["dtype"]
    return hf


def _save_processor(model, folder: Path) -> None:
    if model.processor is not None:
        model.processor.hf.save_pretrained(str(folder))


def save_converted(model, out_dir: str | os.PathLike, *, force: bool = False) -> str:
    """Writes `model` as a converted checkpoint; returns the folder."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    with atomic_output_dir(out, force) as tmp:
        _checkpointer().save(tmp / "params", args=ocp.args.PyTreeSave(model.params))
        meta = {
            "format": "vlm_jax",
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(model.config),
            "hf_config": _hf_config_for(model, model.dtype),
            "layout": dataclasses.asdict(model.layout),
            "dtype": _dtype_name(model.dtype),
            "num_params": model.num_params,
        }
        (tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
        _save_processor(model, tmp)
    return str(out)


def read_converted_config(folder: str | os.PathLike):
    """The LlavaConfig a converted checkpoint was written with (reads only its metadata)."""
    meta = json.loads((Path(folder) / FORMAT_FILE).read_text())
    return config_from_dict(meta["config"])


def load_converted(folder: str | os.PathLike, dtype=None, *, shardings=None):
    """(params, config, hf_config, layout) from a converted checkpoint.

    dtype casts while restoring; shardings (a tree of jax.sharding.Sharding like the params)
    restores every parameter straight into its shards.
    """
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    meta = json.loads((folder / FORMAT_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{folder} was written by another vlm_jax checkpoint format (version "
            f"{meta.get('format_version')}, this vlm_jax reads {FORMAT_VERSION}). Fix: convert the "
            "HF checkpoint again with `vlm-jax convert`."
        )
    cfg = config_from_dict(meta["config"])
    target_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(meta["dtype"])
    abstract = llava.abstract_params(cfg, target_dtype)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    restore_args = jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=s), abstract, shardings)
    try:
        largest = max(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
        params = _checkpointer(largest).restore(folder / "params", args=ocp.args.PyTreeRestore(abstract, restore_args))
    except ValueError as e:
        raise CheckpointMismatchError(
            f"{folder}/params does not hold the parameters its vlm_jax.json describes ({e}). "
            "Fix: convert the checkpoint again."
        ) from e
    return params, cfg, meta["hf_config"], Layout(**meta["layout"])


def export_hf(model, out_dir: str | os.PathLike, *, force: bool = False, dtype=None,
              max_shard_bytes: int = 5 * 1024**3) -> str:
    """Writes a transformers folder for `model` (same tensor names as its source)."""
    target = jnp.dtype(dtype) if dtype is not None else None  # each tensor is cast on the host as it is written
    out = Path(out_dir).absolute()
    if not is_writer():  # several hosts: take part in gathering every tensor; process 0 writes
        for _ in hf_tensors(model.params, model.config, model.layout, target):
            pass
        return str(out)
    with atomic_output_dir(out, force) as tmp:
        write_safetensors(model.params, model.config, str(tmp), model.layout, max_shard_bytes, target)
        (tmp / "config.json").write_text(json.dumps(_hf_config_for(model, dtype or model.dtype), indent=2))
        _save_processor(model, tmp)
    return str(out)
