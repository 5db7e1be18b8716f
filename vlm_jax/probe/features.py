"""Feature extraction: stream a dataset through the model, pool, and write to disk.

For every example and every requested (site, pooling) pair this writes one row of a
memory-mapped .npy array [N, L, D] (L = the site's layers, 1 for non-layer sites), so a
100k x 33 x 4096 extraction never has to fit in memory. Rows are written batch by batch and
`progress.json` records how many are done (atomically, after the rows are flushed): an
interrupted extraction resumes where it stopped and yields the same arrays. The next batch's
examples are read and processed on a background thread while the model runs (`prefetch`).

Poolings (each a weighted mean over positions, computed inside the compiled call):
  image_mean   text sites: the image-token positions; vision sites: the patch tokens
  cls          vision sites: the class token of the example's images (averaged if several)
  last         text sites: the last real token
  position     text sites: example["position"] (an index into the prompt; negative from the end)
  region_mean  text sites: example["region"] = {"image": i, "box": (x0, y0, x1, y1)} or
               {"image": i, "mask": bool [H, W]} in the original image's pixels, or
               {"positions": [...]} token indices; vision sites: the same region's patches
  grid         no pooling: every patch of the example's first image, [N, L, rows * cols, D]
               (for dense heads on the patch grid)

Every pooling applies to the requested sites it makes sense for (e.g. 'last' to text sites,
'cls' to vision sites). Examples are mappings with "prompt" (text with one <image> per image) and "images" (a list of
PIL images); a dataset is any sequence of them (len + indexing), e.g. a list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import InputError
from vlm_jax.interp.geometry import ImageGeometry
from vlm_jax.interp.sites import ALL_SITES, validate_capture
from vlm_jax.models import llava
from vlm_jax.multihost import from_writer, is_writer, to_host
from vlm_jax.nn.attention import resolve_fused
from vlm_jax.prefetch import Prefetcher, check_depth

POOLINGS = ("image_mean", "cls", "last", "position", "region_mean", "grid")
VISION_POOLINGS = ("image_mean", "cls", "region_mean", "grid")
TEXT_POOLINGS = ("image_mean", "last", "position", "region_mean", "grid")
EXTRACTABLE = tuple(s for s in ALL_SITES if not s.endswith(("attn_pattern", ".q", ".k", ".v", ".z", "logits")))


class ExtractionError(InputError):
    """Bad extraction arguments or a feature folder that does not match them."""


IMAGE_LEVEL = ("vision.features", "projector.out")  # per image, after the select strategy


def _site_tower(site: str) -> str:
    return "vision" if site.startswith("vision.") or site == "projector.out" else "text"


def _allowed(site: str) -> tuple[str, ...]:
    if site in IMAGE_LEVEL:
        return ("image_mean", "region_mean", "grid")
    return VISION_POOLINGS if _site_tower(site) == "vision" else TEXT_POOLINGS


def _check_request(sites, pooling) -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[str, str]]]:
    """Validated sites and poolings, and the (site, pooling) pairs that apply."""
    sites = validate_capture(sites)
    for site in sites:
        if site not in EXTRACTABLE:
            raise ExtractionError(f"{site} cannot be pooled into features; choose from {', '.join(EXTRACTABLE)}")
    pooling = tuple(pooling)
    if not sites or not pooling:
        raise ExtractionError("give at least one site and one pooling")
    for pool in pooling:
        if pool not in POOLINGS:
            raise ExtractionError(f"unknown pooling {pool!r}; choose from {', '.join(POOLINGS)}")
        if not any(pool in _allowed(site) for site in sites):
            raise ExtractionError(f"pooling {pool!r} applies to none of {list(sites)} (vision sites take "
                                  f"{', '.join(VISION_POOLINGS)}; text sites {', '.join(TEXT_POOLINGS)})")
    pairs = [(site, pool) for site in sites for pool in pooling if pool in _allowed(site)]
    return sites, pooling, pairs


@dataclass
class FeatureStore:
    """A folder of extracted features: arrays()[(site, pooling)] -> memmap [N, L, D]."""

    folder: str

    @property
    def meta(self) -> dict:
        with open(os.path.join(self.folder, "meta.json")) as f:
            return json.load(f)

    @property
    def done(self) -> int:
        path = os.path.join(self.folder, "progress.json")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return int(json.load(f)["done"])

    def path(self, site: str, pooling: str) -> str:
        return os.path.join(self.folder, f"{site}.{pooling}.npy")

    def load(self, site: str, pooling: str, mode: str = "r") -> np.ndarray:
        """[N, L, D] memory-mapped array (mode 'r' read-only, 'r+' writable). Raises
        ExtractionError, naming what the folder holds, where it holds no such features."""
        if not os.path.exists(os.path.join(self.folder, "meta.json")):
            raise ExtractionError(f"{self.folder} holds no extracted features (no meta.json there). Fix: write them "
                                  f"first with `vlm-jax extract ... --out {self.folder}` (or probe.features."
                                  "extract_features), or point at the folder that run wrote.")
        if not os.path.exists(self.path(site, pooling)):
            held = ", ".join(sorted(self.meta.get("shapes", {}))) or "nothing yet"
            raise ExtractionError(f"{self.folder} holds no features of site {site!r} pooled by {pooling!r}; it holds "
                                  f"{held} (site.pooling). Fix: choose one of those, or extract that site and "
                                  "pooling into a new folder.")
        return np.load(self.path(site, pooling), mmap_mode=mode)

    def layers_first(self, site: str, pooling: str) -> np.ndarray:
        """[L, N, D] (a transposed view) for the probes."""
        return np.moveaxis(self.load(site, pooling), 1, 0)

    def _write_progress(self, done: int) -> None:
        tmp = os.path.join(self.folder, ".progress.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"done": done}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.folder, "progress.json"))


def _site_layers(cfg, site: str) -> int:
    name = site.split(".", 1)[1]
    if site in ("vision.features", "projector.out", "text.embed", "text.final"):
        return 1
    tower = cfg.vision if site.startswith("vision.") else cfg.text
    return tower.num_layers + (1 if name == "hidden_states" else 0)


def _site_width(cfg, site: str) -> int:
    if site == "vision.features":
        return cfg.vision.hidden_size * len(cfg.vision_feature_layers)
    return cfg.vision.hidden_size if site.startswith("vision.") else cfg.text.hidden_size


def _region_positions(model, example: Mapping, batch, row: int, image_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(text positions in the row, (image, vision-token) pairs) of an example's region."""
    region = example.get("region")
    if region is None:
        raise ExtractionError("pooling 'region_mean' needs example['region']")
    tmap = batch.image_tokens
    if "positions" in region:
        positions = np.asarray(region["positions"], int)
        pairs = [(int(tmap.image_index[row, p]), int(tmap.token_index[row, p])) for p in positions
                 if tmap.image_index[row, p] >= 0]
        return positions, np.array(pairs, int).reshape(-1, 2)
    image = int(region.get("image", 0))
    geometry = ImageGeometry.from_processor(model.processor.hf.image_processor, example["images"][image],
                                            model.config.vision.patch_size)
    if "box" in region:
        patches = geometry.box_patches(region["box"], min_coverage=region.get("min_coverage", 1e-9))
    elif "mask" in region:
        patches = geometry.mask_patches(region["mask"], min_coverage=region.get("min_coverage", 0.5))
    else:
        raise ExtractionError("a region needs 'box', 'mask' or 'positions'")
    if not patches.any():
        raise ExtractionError(f"the region of example {example.get('id', '?')} covers no patch")
    _, grid = tmap.grid_positions(image_offset + image)
    positions = grid[patches]
    rows, cols = np.nonzero(patches)
    vision_index = model.config.vision.num_prefix_tokens + rows * grid.shape[1] + cols
    return positions, np.stack([np.full_like(vision_index, image_offset + image), vision_index], axis=1)


def _pool_weights(model, examples: Sequence[Mapping], batch, pooling: tuple[str, ...], width: int, n_images: int):
    """Per pooling: text weights [B, T] and vision weights [B, N, P] (rows sum to 1)."""
    cfg = model.config
    b = len(examples)
    p_tokens = cfg.vision.grid_size**2 + cfg.vision.num_prefix_tokens
    n_patches = cfg.vision.grid_size**2
    k = {pool: (n_patches if pool == "grid" else 1) for pool in pooling}
    text_w = {pool: np.zeros((b, k[pool], width), np.float32) for pool in pooling}
    vision_w = {pool: np.zeros((b, k[pool], max(n_images, 1), p_tokens), np.float32) for pool in pooling}
    tmap = batch.image_tokens
    offset = 0
    for row, example in enumerate(examples):
        n_img = len(example.get("images") or [])
        mine = list(range(offset, offset + n_img))
        for pool in pooling:
            tw, vw = text_w[pool][row], vision_w[pool][row]  # [K, T], [K, N, P]
            if pool == "image_mean":
                tw[0] = tmap.image_mask[row]
                for i in mine:
                    vw[0, i, cfg.vision.num_prefix_tokens:] = 1.0
            elif pool == "cls":
                for i in mine:
                    vw[0, i, 0] = 1.0
            elif pool == "last":
                tw[0, batch.last_positions[row]] = 1.0
            elif pool == "position":
                if "position" not in example:
                    raise ExtractionError("pooling 'position' needs example['position']")
                real = np.nonzero(batch.attention_mask[row])[0]
                tw[0, real[int(example["position"])]] = 1.0
            elif pool == "region_mean":
                positions, pairs = _region_positions(model, example, batch, row, offset)
                tw[0, positions] = 1.0
                for image, token in pairs:
                    vw[0, image, token] = 1.0
            elif pool == "grid":
                if not mine:
                    raise ExtractionError("pooling 'grid' needs an image in every example")
                _, grid = tmap.grid_positions(mine[0])
                tw[np.arange(n_patches), grid.reshape(-1)] = 1.0
                vw[np.arange(n_patches), mine[0], cfg.vision.num_prefix_tokens + np.arange(n_patches)] = 1.0
        offset += n_img
    for weights in (text_w, vision_w):
        for pool, w in weights.items():
            total = w.reshape(b, w.shape[1], -1).sum(axis=2)
            w /= np.where(total > 0, total, 1.0).reshape((b, w.shape[1]) + (1,) * (w.ndim - 2))
    return text_w, vision_w


def _stack_site(acts: dict, site: str) -> jax.Array:
    """A captured site as [L, B(or N), T, D]."""
    value = acts[site]
    if site in ("vision.features", "projector.out", "text.embed", "text.final"):
        value = value[None]
    return value


def _pooled_features(params, arrays, text_w, vision_w, *, config, sites: tuple[str, ...],
                     pairs: tuple[tuple[str, str], ...], fused: bool) -> dict:
    """One batch through the model, pooled: {(site, pooling): [B, L, D] (grid: [B, L, K, D])}.

    text_w {pooling: [B, K, T]} and vision_w {pooling: [B, K, N, P]} are the pooling weights
    (_pool_weights). Compiled once per (config, sites, pairs) and batch shape, shared by every
    extract_features call (a jit made per call compiled the model again each time). fused: the
    fused attention kernel wherever a layer's pattern is not among the sites.
    """
    out = llava.forward(params, config, arrays, capture=sites, compute_logits=False, fused_attention=fused)
    pooled = {}
    for site in sites:
        x = _stack_site(out.acts, site).astype(jnp.float32)
        for pool_name in [p for s, p in pairs if s == site]:
            if _site_tower(site) == "vision":
                w = vision_w[pool_name]  # [B, K, N, P]
                if site in IMAGE_LEVEL:  # [1, N, P', D]: the tokens the select strategy kept
                    w = w[..., w.shape[-1] - x.shape[2]:]
                    w = w / jnp.maximum(jnp.sum(w, axis=(2, 3), keepdims=True), 1e-30)
                y = jnp.einsum("lnpd,bknp->blkd", x, w)
            else:
                y = jnp.einsum("lbtd,bkt->blkd", x, text_w[pool_name])
            pooled[(site, pool_name)] = y if pool_name == "grid" else y[:, :, 0]
    return pooled


_pooled_features_jit = jax.jit(_pooled_features, static_argnames=("config", "sites", "pairs", "fused"))


def extract_features(model, examples: Sequence[Mapping], out_dir: str, *, sites=("text.resid_post",),
                     pooling=("image_mean", "last"), batch_size: int = 8, dtype: str = "float32",
                     token_bucket: int = 64, progress: bool = True,
                     fused_attention: bool | None = None, prefetch: int = 1) -> FeatureStore:
    """Extracts pooled features of `examples` at `sites` into `out_dir` (resumes if present).

    fused_attention: None uses the fused attention kernel on accelerators (cuDNN flash
    attention on GPU) and the explicit path on CPU; True/False to choose.
    prefetch: batches prepared ahead (examples read, the processor run, pooling weights built) on
    a background thread while the model runs the current one (vlm_jax.prefetch); 0: none.

    On several hosts (jax.distributed) every process runs this with the same examples; the
    batch is split over all devices, and process 0 writes the folder (on its own disk or a
    shared one); the other processes write nothing.
    """
    sites, pooling, pairs = _check_request(sites, pooling)
    check_depth(prefetch, "prefetch")
    cfg = model.config
    n = len(examples)
    if n == 0:
        raise ExtractionError("the dataset is empty")
    store = FeatureStore(out_dir)
    meta = {
        "sites": list(sites), "pooling": list(pooling), "n_examples": n, "dtype": dtype, "model": model.source,
        "shapes": {f"{s}.{p}": [n, _site_layers(cfg, s), *([cfg.vision.grid_size**2] if p == "grid" else []),
                                _site_width(cfg, s)] for s, p in pairs},
    }
    # Several hosts: process 0 alone reads and writes the folder, and tells the others what it
    # found (a mismatched folder, how far a previous run got), so every process takes the same path.
    writer = is_writer()
    meta_path = os.path.join(out_dir, "meta.json")
    found = None
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(meta_path):
            found = store.meta
        else:
            for key, shape in meta["shapes"].items():
                np.lib.format.open_memmap(os.path.join(out_dir, f"{key}.npy"), mode="w+", dtype=dtype,
                                          shape=tuple(shape))
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(meta_path + ".tmp", meta_path)
            store._write_progress(0)
    if from_writer(found is not None and found != meta):
        raise ExtractionError(
            f"{out_dir} holds features of another extraction ({found if writer else 'see process 0'}); fix: use a "
            "new folder, or delete it to start over")
    arrays = {(s, p): store.load(s, p, mode="r+") for s, p in pairs} if writer else {}
    start = from_writer(store.done if writer else 0)
    fused = resolve_fused(fused_attention)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=start, desc="extracting features", unit="ex")

    def host_batch(first: int):
        """The host half of the batch starting at example `first` (numpy only: it may run on the
        prefetch thread): (examples in it, model input arrays, text and vision pooling weights)."""
        chunk = [examples[i] for i in range(first, min(first + batch_size, n))]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static shapes: one compilation
        images = [img for ex in padded for img in (ex.get("images") or [])]
        batch = model.prepare([ex["prompt"] for ex in padded], images=images or None)
        width = -(-batch.input_ids.shape[1] // token_bucket) * token_bucket
        batch = _left_pad(batch, width, cfg.text.pad_token_id or 0, cfg)
        text_w, vision_w = _pool_weights(model, padded, batch, pooling, width, len(images))
        return len(chunk), model._arrays(batch), text_w, vision_w

    with Prefetcher(host_batch, range(start, n, batch_size), prefetch) as batches:
        for first, (count, inputs, text_w, vision_w) in batches:
            with model.mesh_context():  # sharded models: the batch is split over data x fsdp
                pooled = _pooled_features_jit(model.params, model.place(inputs), model.place(text_w),
                                              model.place(vision_w), config=cfg, sites=sites, pairs=tuple(pairs),
                                              fused=fused)
            for key, value in pooled.items():
                value = to_host(value)  # every process takes part in gathering a batch split over hosts
                if writer:
                    arrays[key][first:first + count] = value[:count].astype(dtype)
            if writer:
                for array in arrays.values():
                    array.flush()
                store._write_progress(first + count)
            if bar is not None:
                bar.update(count)
    if bar is not None:
        bar.close()
    return store


def _left_pad(batch, width: int, pad_id: int, cfg):
    """The batch left-padded to `width` tokens (so batches of similar length share a compilation)."""
    from vlm_jax.inputs import Batch, image_token_map

    extra = width - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    ids = np.pad(batch.input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(batch.attention_mask, ((0, 0), (extra, 0)))
    grid = batch.image_tokens.grid if batch.image_tokens is not None else None
    return Batch(ids, mask, batch.pixel_values, image_token_map(ids, cfg, grid))
