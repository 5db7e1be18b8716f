"""transformers safetensors <-> vlm_jax parameters.

One table (`tensor_rules`) says, for every tensor of an HF LLaVA checkpoint, which
parameter it becomes and how (transpose, split heads, reshape). Loading reads every shard's
header first and reports all missing, unexpected and mis-shaped tensors in one error; then it
streams: one parameter (all layers of it) is assembled in host memory, handed to JAX and
released before the next is read, so a model never sits twice in host memory.

Key layouts: transformers has written LLaVA checkpoints as `language_model.model.*` /
`language_model.lm_head.*` (legacy) and as `model.language_model.*` / `lm_head.*`
(current), vision towers with or without an inner `vision_model.`, and DINOv2 attention as
`attention.attention.query` or `attention.q_proj`. All are read; the layout found is kept
so that export writes tensors back under the same names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from vlm_jax.config import LlavaConfig
from vlm_jax.errors import CorruptCheckpointError, WeightsMismatchError
from vlm_jax.models import llava
from vlm_jax.models import params as P
from vlm_jax.multihost import to_host
from vlm_jax.safetensors_io import TensorEntry, TensorReader, read_header

# Buffers some checkpoints carry that are not parameters (transformers ignores them too).
IGNORED_SUFFIXES = (".position_ids", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Layout:
    """How an HF checkpoint names its tensors (see module docstring)."""

    top: str = "legacy"  # "legacy": language_model.model.*  |  "current": model.language_model.*
    vision_inner: bool = True  # vision_tower.vision_model.* (CLIP/SigLIP)
    dinov2_names: str = "legacy"  # attention.attention.query  |  "current": attention.q_proj

    @classmethod
    def default(cls, cfg: LlavaConfig) -> "Layout":
        """The layout of the llava-hf checkpoints (loads in every transformers version)."""
        return cls(vision_inner=cfg.vision.family in ("clip", "siglip"))


@dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more (parameter path, layer index) targets."""

    hf_key: str  # canonical name (legacy layout, no inner vision_model.)
    targets: tuple[tuple[tuple, int | None], ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable  # np.ndarray -> tuple of arrays (one per target)
    to_hf: Callable  # tuple of arrays -> np.ndarray


# ---------------------------------------------------------------------------------------------
# transforms between HF [out, in] weights and our layouts


def _identity(shape):
    return (lambda a: (a.reshape(shape),)), (lambda parts: parts[0])


def _reshape(ours_shape, hf_shape):
    return (lambda a: (a.reshape(ours_shape),)), (lambda parts: parts[0].reshape(hf_shape))


def _linear():
    return (lambda a: (a.T,)), (lambda parts: parts[0].T)


def _heads_in(n_heads, head_dim):  # [H*E, D] -> [D, H, E]
    return (
        lambda a: (a.T.reshape(a.shape[1], n_heads, head_dim),),
        lambda parts: parts[0].reshape(parts[0].shape[0], -1).T,
    )


def _heads_bias(n_heads, head_dim):  # [H*E] -> [H, E]
    return (lambda a: (a.reshape(n_heads, head_dim),)), (lambda parts: parts[0].reshape(-1))


def _heads_out(n_heads, head_dim):  # [D, H*E] -> [H, E, D]
    return (
        lambda a: (a.T.reshape(n_heads, head_dim, a.shape[0]),),
        lambda parts: parts[0].reshape(-1, parts[0].shape[-1]).T,
    )


def _conv():  # [D, C, p, p] -> [C, p, p, D]
    return (lambda a: (a.transpose(1, 2, 3, 0),)), (lambda parts: parts[0].transpose(3, 0, 1, 2))


def _split_in_two_linears():  # DINOv2 SwiGLU weights_in [2F, D] -> gate [D, F], up [D, F]
    def to_ours(a):
        half = a.shape[0] // 2
        return a[:half].T, a[half:].T

    return to_ours, lambda parts: np.concatenate([parts[0].T, parts[1].T], axis=0)


def _split_bias_in_two():
    def to_ours(a):
        half = a.shape[0] // 2
        return a[:half], a[half:]

    return to_ours, lambda parts: np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# the table


def tensor_rules(cfg: LlavaConfig) -> list[TensorRule]:
    """Every tensor of the HF checkpoint for `cfg`, in canonical names."""
    specs = P.flatten(llava.param_specs(cfg))
    rules: list[TensorRule] = []

    def add(hf_key, targets, hf_shape, transforms):
        rules.append(TensorRule(hf_key, tuple(targets), tuple(hf_shape), *transforms))

    def our_shape(path, layer):
        shape = specs[path].shape
        return shape[1:] if layer is not None else shape

    def linear_pair(hf_prefix, path, layer=None, bias=True, heads=None, out_heads=None):
        """weight (+bias) of a Linear; heads=(n, e) for q/k/v, out_heads=(n, e) for o_proj."""
        kshape = our_shape(path + ("kernel",), layer)
        if heads:
            n, e = heads
            add(f"{hf_prefix}.weight", [(path + ("kernel",), layer)], (n * e, kshape[0]), _heads_in(n, e))
            if bias:
                add(f"{hf_prefix}.bias", [(path + ("bias",), layer)], (n * e,), _heads_bias(n, e))
            return
        if out_heads:
            n, e = out_heads
            add(f"{hf_prefix}.weight", [(path + ("kernel",), layer)], (kshape[-1], n * e), _heads_out(n, e))
        else:
            add(f"{hf_prefix}.weight", [(path + ("kernel",), layer)], kshape[::-1], _linear())
        if bias:
            add(f"{hf_prefix}.bias", [(path + ("bias",), layer)], (kshape[-1],), _identity(kshape[-1:]))

    def norm_pair(hf_prefix, path, layer=None, bias=True):
        shape = our_shape(path + ("scale",), layer)
        add(f"{hf_prefix}.weight", [(path + ("scale",), layer)], shape, _identity(shape))
        if bias:
            add(f"{hf_prefix}.bias", [(path + ("bias",), layer)], shape, _identity(shape))

    def plain(hf_key, path, layer=None, hf_shape=None):
        shape = our_shape(path, layer)
        if hf_shape is None or tuple(hf_shape) == tuple(shape):
            add(hf_key, [(path, layer)], shape, _identity(shape))
        else:
            add(hf_key, [(path, layer)], hf_shape, _reshape(shape, hf_shape))

    # --- text decoder
    t = cfg.text
    lm = ("language_model",)
    plain("language_model.model.embed_tokens.weight", lm + ("embed_tokens", "embedding"))
    norm_pair("language_model.model.norm", lm + ("norm",), bias=False)
    for i in range(t.num_layers):
        pre = f"language_model.model.layers.{i}"
        lp = lm + ("layers",)
        norm_pair(f"{pre}.input_layernorm", lp + ("input_layernorm",), i, bias=False)
        norm_pair(f"{pre}.post_attention_layernorm", lp + ("post_attention_layernorm",), i, bias=False)
        for name, n in (("q_proj", t.num_heads), ("k_proj", t.num_kv_heads), ("v_proj", t.num_kv_heads)):
            linear_pair(f"{pre}.self_attn.{name}", lp + ("self_attn", name), i, t.qkv_bias, heads=(n, t.head_dim))
        linear_pair(f"{pre}.self_attn.o_proj", lp + ("self_attn", "o_proj"), i, t.o_bias,
                    out_heads=(t.num_heads, t.head_dim))
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear_pair(f"{pre}.mlp.{name}", lp + ("mlp", name), i, t.mlp_bias)
    if not t.tie_word_embeddings:
        linear_pair("language_model.lm_head", ("lm_head",), bias=False)

    # --- projector
    for name in ("linear_1", "linear_2"):
        linear_pair(f"multi_modal_projector.{name}", ("multi_modal_projector", name), bias=cfg.projector_bias)

    # --- vision tower
    v = cfg.vision
    vt = ("vision_tower",)
    emb = vt + ("embeddings",)
    heads = (v.num_heads, v.head_dim)
    if v.family in ("clip", "siglip"):
        add("vision_tower.embeddings.patch_embedding.weight", [(emb + ("patch_embedding", "kernel"), None)],
            (v.hidden_size, v.num_channels, v.patch_size, v.patch_size), _conv())
        if v.patch_bias:
            plain("vision_tower.embeddings.patch_embedding.bias", emb + ("patch_embedding", "bias"))
        if v.class_token:
            plain("vision_tower.embeddings.class_embedding", emb + ("class_embedding",))
        plain("vision_tower.embeddings.position_embedding.weight", emb + ("position_embedding", "embedding"))
        if v.pre_layernorm:
            norm_pair("vision_tower.pre_layrnorm", vt + ("pre_layrnorm",))
        for i in range(v.num_layers):
            pre, lp = f"vision_tower.encoder.layers.{i}", vt + ("layers",)
            norm_pair(f"{pre}.layer_norm1", lp + ("layer_norm1",), i)
            norm_pair(f"{pre}.layer_norm2", lp + ("layer_norm2",), i)
            for name in ("q_proj", "k_proj", "v_proj"):
                linear_pair(f"{pre}.self_attn.{name}", lp + ("self_attn", name), i, v.qkv_bias, heads=heads)
            linear_pair(f"{pre}.self_attn.out_proj", lp + ("self_attn", "out_proj"), i, out_heads=heads)
            linear_pair(f"{pre}.mlp.fc1", lp + ("mlp", "fc1"), i)
            linear_pair(f"{pre}.mlp.fc2", lp + ("mlp", "fc2"), i)
        norm_pair("vision_tower.post_layernorm", vt + ("post_layernorm",))
        if v.use_head:
            hd = vt + ("head",)
            plain("vision_tower.head.probe", hd + ("probe",), hf_shape=(1, 1, v.hidden_size))
            add("vision_tower.head.attention.in_proj_weight", [(hd + ("attention", "in_proj", "kernel"), None)],
                (3 * v.hidden_size, v.hidden_size), _linear())
            plain("vision_tower.head.attention.in_proj_bias", hd + ("attention", "in_proj", "bias"))
            linear_pair("vision_tower.head.attention.out_proj", hd + ("attention", "out_proj"))
            norm_pair("vision_tower.head.layernorm", hd + ("layernorm",))
            linear_pair("vision_tower.head.mlp.fc1", hd + ("mlp", "fc1"))
            linear_pair("vision_tower.head.mlp.fc2", hd + ("mlp", "fc2"))
        return rules

    d = v.hidden_size  # DINOv2, in the names transformers saves
    plain("vision_tower.embeddings.cls_token", emb + ("class_embedding",), hf_shape=(1, 1, d))
    if v.use_mask_token:
        plain("vision_tower.embeddings.mask_token", emb + ("mask_token",), hf_shape=(1, d))
    plain("vision_tower.embeddings.position_embeddings", emb + ("position_embedding", "embedding"),
          hf_shape=(1, v.num_positions, d))
    if v.num_register_tokens:
        plain("vision_tower.embeddings.register_tokens", emb + ("register_tokens",),
              hf_shape=(1, v.num_register_tokens, d))
    add("vision_tower.embeddings.patch_embeddings.projection.weight", [(emb + ("patch_embedding", "kernel"), None)],
        (d, v.num_channels, v.patch_size, v.patch_size), _conv())
    plain("vision_tower.embeddings.patch_embeddings.projection.bias", emb + ("patch_embedding", "bias"))
    for i in range(v.num_layers):
        pre, lp = f"vision_tower.encoder.layer.{i}", vt + ("layers",)
        norm_pair(f"{pre}.norm1", lp + ("layer_norm1",), i)
        norm_pair(f"{pre}.norm2", lp + ("layer_norm2",), i)
        for hf_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            linear_pair(f"{pre}.attention.attention.{hf_name}", lp + ("self_attn", name), i, v.qkv_bias, heads=heads)
        linear_pair(f"{pre}.attention.output.dense", lp + ("self_attn", "out_proj"), i, out_heads=heads)
        plain(f"{pre}.layer_scale1.lambda1", lp + ("layer_scale1", "lambda1"), i)
        plain(f"{pre}.layer_scale2.lambda1", lp + ("layer_scale2", "lambda1"), i)
        if v.swiglu:
            f_ = v.intermediate_size
            mlp = lp + ("mlp",)
            add(f"{pre}.mlp.weights_in.weight", [(mlp + ("gate_proj", "kernel"), i), (mlp + ("up_proj", "kernel"), i)],
                (2 * f_, d), _split_in_two_linears())
            add(f"{pre}.mlp.weights_in.bias", [(mlp + ("gate_proj", "bias"), i), (mlp + ("up_proj", "bias"), i)],
                (2 * f_,), _split_bias_in_two())
            linear_pair(f"{pre}.mlp.weights_out", mlp + ("down_proj",), i)
        else:
            linear_pair(f"{pre}.mlp.fc1", lp + ("mlp", "fc1"), i)
            linear_pair(f"{pre}.mlp.fc2", lp + ("mlp", "fc2"), i)
    norm_pair("vision_tower.layernorm", vt + ("post_layernorm",))
    return rules


# ---------------------------------------------------------------------------------------------
# key layouts

_DINO_CURRENT = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)


def canonical_name(key: str) -> str:
    """Any layout's tensor name -> the canonical name used in tensor_rules."""
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key[len("vision_tower.vision_model."):]
    if key.startswith("vision_tower.encoder.layer."):
        for current, legacy in _DINO_CURRENT:
            key = key.replace(current, legacy)
    return key


def detect_layout(keys) -> Layout:
    keys = list(keys)
    current = any(k.startswith(("model.language_model.", "model.vision_tower.", "model.multi_modal_projector."))
                  for k in keys)
    inner = any(".vision_tower.vision_model." in f".{k}" for k in keys)
    dino_current = any(k.startswith(("vision_tower.", "model.vision_tower.")) and ".attention.q_proj." in k
                       for k in keys)
    return Layout("current" if current else "legacy", inner, "current" if dino_current else "legacy")


def layout_name(canonical: str, layout: Layout) -> str:
    """Canonical name -> the name a checkpoint with `layout` uses."""
    key = canonical
    if key.startswith("vision_tower.encoder.layer.") and layout.dinov2_names == "current":
        for current, legacy in _DINO_CURRENT:
            key = key.replace(legacy, current)
    if key.startswith("vision_tower.") and layout.vision_inner:
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    if layout.top == "current":
        for legacy, current in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if key.startswith(legacy):
                return current + key[len(legacy):]
    return key


# ---------------------------------------------------------------------------------------------
# loading


def safetensors_files(folder: str) -> list[str]:
    """The .safetensors files of an HF folder (single file or sharded with an index)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(folder, name))]
        if missing:
            raise CorruptCheckpointError(
                f"{folder}: model.safetensors.index.json lists shard(s) that are not in the folder: "
                f"{missing}. Fix: download the complete checkpoint."
            )
        return [os.path.join(folder, name) for name in files]
    if os.path.exists(single):
        return [single]
    others = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (
        f" It holds PyTorch pickles {others}: re-save it with transformers "
        "(model.save_pretrained(out, safe_serialization=True))." if others else ""
    )
    raise CorruptCheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json.{hint}")


@dataclass
class WeightIndex:
    """Every tensor of a checkpoint by canonical name, plus the layout found."""

    entries: dict[str, TensorEntry]
    layout: Layout
    original_names: dict[str, str] = field(default_factory=dict)


def index_checkpoint(folder: str) -> WeightIndex:
    entries: dict[str, TensorEntry] = {}
    originals: dict[str, str] = {}
    for path in safetensors_files(folder):
        for name, entry in read_header(path).items():
            canon = canonical_name(name)
            entries[canon] = entry
            originals[canon] = name
    return WeightIndex(entries, detect_layout(originals.values()), originals)


def check_weights(index: WeightIndex, rules: list[TensorRule], cfg: LlavaConfig, source: str) -> None:
    """Raises one WeightsMismatchError listing every missing, unexpected or mis-shaped tensor."""
    expected = {r.hf_key: r for r in rules}
    missing = [layout_name(k, index.layout) for k in expected if k not in index.entries]
    unexpected, mismatched = [], []
    for canon, entry in index.entries.items():
        rule = expected.get(canon)
        if rule is None:
            tied_head = cfg.text.tie_word_embeddings and canon == "language_model.lm_head.weight"
            if not (tied_head or canon.endswith(IGNORED_SUFFIXES)):
                unexpected.append(index.original_names[canon])
        elif tuple(entry.shape) != rule.hf_shape:
            mismatched.append((index.original_names[canon], rule.hf_shape, entry.shape))
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched)


def load_hf_params(folder: str, cfg: LlavaConfig, dtype=None, *, shardings=None, progress: bool = False):
    """Streams an HF folder's safetensors into a parameter tree.

    Args:
      dtype: parameter dtype (None keeps each tensor's stored dtype).
      shardings: optional tree (like the params) of jax.sharding.Sharding. Each parameter is
        then assembled straight into its shards: only the shards this host's devices hold
        are built, only the layers they need are read, and the whole model never sits on
        one host (peak host memory ~ one HF tensor + one parameter's local shards).

    Returns:
      (params, Layout of the checkpoint).
    """
    index = index_checkpoint(folder)
    rules = tensor_rules(cfg)
    check_weights(index, rules, cfg, folder)
    specs = P.flatten(llava.param_specs(cfg))
    flat_shardings = P.flatten(shardings) if shardings is not None else {}
    # parameter path -> [(rule, which target, layer)]
    by_param: dict[tuple, list] = {path: [] for path in specs}
    for rule in rules:
        for which, (path, layer) in enumerate(rule.targets):
            by_param[path].append((rule, which, layer))
    flat = {}
    items = list(by_param.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"loading {os.path.basename(os.path.normpath(folder))}", unit="param")
    with TensorReader() as reader:
        for path, sources in items:
            first = index.entries[sources[0][0].hf_key]
            target_dtype = np.dtype(dtype) if dtype is not None else first.dtype
            sharding = flat_shardings.get(path)
            if sharding is None:
                flat[path] = jax.device_put(_assemble(reader, index, sources, specs[path].shape, target_dtype, None))
            else:
                flat[path] = _assemble_sharded(reader, index, sources, specs[path].shape, target_dtype, sharding)
    return P.unflatten(flat), index.layout


def _normalise(index: tuple, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _assemble(reader, index, sources, shape, dtype, region: tuple[slice, ...] | None) -> np.ndarray:
    """One parameter (or the `region` of it) from its HF tensors, reading only what it needs."""
    region = region or tuple(slice(0, n) for n in shape)
    buffer = np.empty(tuple(s.stop - s.start for s in region), dtype)
    for rule, which, layer in sources:
        if layer is not None and not region[0].start <= layer < region[0].stop:
            continue  # this layer lives on other devices
        part = rule.to_ours(reader.read(index.entries[rule.hf_key]))[which]
        if layer is None:
            buffer[...] = part[region].astype(dtype, copy=False)
        else:
            buffer[layer - region[0].start] = part[region[1:]].astype(dtype, copy=False)
    return buffer


def _assemble_sharded(reader, index, sources, shape, dtype, sharding) -> jax.Array:
    """A jax.Array with `sharding`, built from this host's shards only (replicas built once)."""
    by_region: dict[tuple, list] = {}
    for device, idx in sharding.addressable_devices_indices_map(tuple(shape)).items():
        key = tuple((s.start, s.stop) for s in _normalise(idx, shape))
        by_region.setdefault(key, []).append(device)
    arrays = []
    for key, devices in by_region.items():
        shard = _assemble(reader, index, sources, shape, dtype, tuple(slice(a, b) for a, b in key))
        arrays += [jax.device_put(shard, d) for d in devices]
        del shard
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


# ---------------------------------------------------------------------------------------------
# export


def hf_tensors(params: dict, cfg: LlavaConfig, layout: Layout | None = None, dtype=None):
    """Yields (HF name, numpy array) for every tensor of the HF checkpoint, one at a time.

    Tensors are produced grouped by parameter, so only one stacked parameter (all its
    layers) is copied to the host at a time, and cast there to `dtype` (None: as stored).
    """
    layout = layout or Layout.default(cfg)
    flat = P.flatten(params)
    rules = sorted(tensor_rules(cfg), key=lambda r: tuple(path for path, _ in r.targets))
    on_host: dict[tuple, np.ndarray] = {}
    for rule in rules:
        paths = tuple(path for path, _ in rule.targets)
        if set(paths) != set(on_host):
            on_host = {path: to_host(flat[path]) for path in paths}  # several hosts: gathered
            if dtype is not None:
                on_host = {path: array.astype(dtype, copy=False) for path, array in on_host.items()}
        parts = tuple(on_host[path] if layer is None else on_host[path][layer] for path, layer in rule.targets)
        yield layout_name(rule.hf_key, layout), np.ascontiguousarray(rule.to_hf(parts))


def write_safetensors(params: dict, cfg: LlavaConfig, folder: str, layout: Layout | None = None,
                      max_shard_bytes: int = 5 * 1024**3, dtype=None) -> list[str]:
    """Writes model.safetensors, or shards plus model.safetensors.index.json, into `folder`.

    Each shard is assembled from at most `max_shard_bytes` of tensors (cast to `dtype` if
    given), written, and freed.
    """
    from safetensors.numpy import save_file

    parts: list[list[str]] = []  # tensor names per written shard
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total = 0

    def flush():
        save_file(shard, os.path.join(folder, f".part-{len(parts)}.safetensors"), metadata={"format": "pt"})
        parts.append(list(shard))

    for name, array in hf_tensors(params, cfg, layout, dtype):
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = array
        shard_bytes += array.nbytes
        total += array.nbytes
    flush()
    n = len(parts)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        os.replace(os.path.join(folder, f".part-{i}.safetensors"), os.path.join(folder, name))
    if n > 1:
        weight_map = {key: names[i] for i, keys in enumerate(parts) for key in keys}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names
