"""Dense heads on the patch grid (study B's depth readout), one per layer, trained together.

Features come from `extract_features(..., pooling=("grid",))`: [N, L, rows * cols, D] (or
already [L, N, rows, cols, D]). A head maps every patch's feature to one number (e.g. depth):
  linear  a 1x1 projection D -> 1
  conv    3x3 conv D -> hidden, ReLU, 3x3 conv hidden -> 1 (sees a patch's neighbours)
All layers' heads train in one compiled step (jax.vmap over layers) with optax AdamW on a
masked mean squared error; minibatches are read from the (possibly memory-mapped) features.
`relative_depth_accuracy` scores study B's task: which of two marked points is closer.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.probe.linear import ProbeDataError


def _as_grid(features, grid: tuple[int, int] | None) -> np.ndarray:
    """[L, N, rows, cols, D] view of features given as [N, L, P, D] or [L, N, rows, cols, D]."""
    if features.ndim == 5:
        return features
    if features.ndim != 4:
        raise ProbeDataError(f"grid features must be [N, L, patches, D] or [L, N, rows, cols, D]; got {features.shape}")
    n, n_layers, patches, d = features.shape
    rows, cols = grid or (int(round(patches**0.5)),) * 2
    if rows * cols != patches:
        raise ProbeDataError(f"{patches} patches do not form a {rows}x{cols} grid; pass grid=(rows, cols)")
    return np.moveaxis(np.asarray(features).reshape(n, n_layers, rows, cols, d), 1, 0)


def _init(kind: str, d: int, hidden: int, key) -> dict:
    if kind == "linear":
        return {"w": jax.random.normal(key, (d, 1)) * d**-0.5, "b": jnp.zeros((1,))}
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (3, 3, d, hidden)) * (9 * d) ** -0.5, "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (3, 3, hidden, 1)) * (9 * hidden) ** -0.5, "b2": jnp.zeros((1,))}


def _apply(kind: str, params: dict, x: jax.Array) -> jax.Array:
    """x [B, rows, cols, D] -> [B, rows, cols]."""
    if kind == "linear":
        return (x @ params["w"] + params["b"])[..., 0]
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(conv(x, params["w1"]) + params["b1"])
    return (conv(h, params["w2"]) + params["b2"])[..., 0]


@flax.struct.dataclass
class DenseHeads:
    params: dict  # leaves with a leading layer axis
    mean: jax.Array  # [L, D] feature standardisation
    scale: jax.Array
    target_mean: jax.Array  # []
    target_scale: jax.Array  # []
    kind: str = flax.struct.field(pytree_node=False, default="linear")

    def predict(self, features, grid=None, batch_size: int = 64) -> np.ndarray:
        """[L, N, rows, cols] predictions in the targets' units."""
        x = _as_grid(features, grid)
        outs = []
        for start in range(0, x.shape[1], batch_size):
            outs.append(np.asarray(_predict(self, jnp.asarray(x[:, start:start + batch_size], jnp.float32))))
        return np.concatenate(outs, axis=1)


@jax.jit
def _predict(heads: DenseHeads, x):
    x = (x - heads.mean[:, None, None, None]) / heads.scale[:, None, None, None]
    out = jax.vmap(functools.partial(_apply, heads.kind))(heads.params, x)
    return out * heads.target_scale + heads.target_mean


def fit_dense_heads(features, targets, mask=None, *, kind: str = "linear", hidden: int = 64, epochs: int = 30,
                    batch_size: int = 32, learning_rate: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                    grid: tuple[int, int] | None = None) -> DenseHeads:
    """Trains one head per layer.

    features: [N, L, rows * cols, D] (extract_features 'grid') or [L, N, rows, cols, D];
    targets [N, rows, cols] (e.g. depth per patch); mask [N, rows, cols] marks the patches with
    a target (default: all).
    """
    if kind not in ("linear", "conv"):
        raise ProbeDataError(f"kind must be 'linear' or 'conv', not {kind!r}")
    x = _as_grid(features, grid)
    n_layers, n = x.shape[:2]
    targets = np.asarray(targets, np.float32)
    if targets.shape != (n, *x.shape[2:4]):
        raise ProbeDataError(f"targets must be [N, rows, cols] = {(n, *x.shape[2:4])}; got {targets.shape}")
    mask = np.ones_like(targets) if mask is None else np.asarray(mask, np.float32)
    if not np.all(np.isfinite(targets[mask > 0])):
        raise ProbeDataError("targets hold NaN or inf values where the mask is set")
    # standardisation from a pass over the data (streamed: features may be a memmap)
    total = np.zeros((n_layers, x.shape[-1]), np.float64)
    squares = np.zeros_like(total)
    for start in range(0, n, batch_size):
        chunk = np.asarray(x[:, start:start + batch_size], np.float64)
        if not np.all(np.isfinite(chunk)):
            raise ProbeDataError("features hold NaN or inf values")
        total += chunk.sum(axis=(1, 2, 3))
        squares += np.square(chunk).sum(axis=(1, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = total / count
    scale = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    t_mean = float(targets[mask > 0].mean())
    t_scale = float(targets[mask > 0].std()) or 1.0

    keys = jax.random.split(jax.random.key(seed), n_layers)
    params = jax.vmap(lambda k: _init(kind, x.shape[-1], hidden, k))(keys)
    steps_per_epoch = -(-n // batch_size)
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    opt = optax.adamw(schedule, weight_decay=weight_decay)
    state = opt.init(params)
    mean_j, scale_j = jnp.asarray(mean, jnp.float32), jnp.asarray(scale, jnp.float32)

    @jax.jit
    def step(params, state, xb, tb, mb):
        xb = (xb - mean_j[:, None, None, None]) / scale_j[:, None, None, None]
        tb = (tb - t_mean) / t_scale

        def loss(p):  # summed over layers: each layer's head gets its own masked MSE gradient
            pred = jax.vmap(functools.partial(_apply, kind))(p, xb)  # [L, B, rows, cols]
            per_layer = jnp.sum(mb * jnp.square(pred - tb), axis=(1, 2, 3)) / jnp.maximum(jnp.sum(mb), 1.0)
            return jnp.sum(per_layer)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = np.sort(order[start:start + batch_size])
            if len(idx) < batch_size:  # keep shapes static: fill with the epoch's first examples
                idx = np.concatenate([idx, order[: batch_size - len(idx)]])
            params, state, _ = step(params, state, jnp.asarray(x[:, idx], jnp.float32), jnp.asarray(targets[idx]),
                                    jnp.asarray(mask[idx]))
    return DenseHeads(params, mean_j, scale_j, jnp.float32(t_mean), jnp.float32(t_scale), kind)


def relative_depth_accuracy(predicted: np.ndarray, points: np.ndarray, closer: np.ndarray) -> np.ndarray:
    """[L] accuracy of "which point is closer" from predicted depth maps [L, N, rows, cols].

    points [N, 2, 2]: (row, col) patch of point A and point B; closer [N]: 0 if A is closer,
    1 if B is (smaller depth = closer).
    """
    points = np.asarray(points)
    n = np.arange(points.shape[0])
    depth_a = predicted[:, n, points[:, 0, 0], points[:, 0, 1]]
    depth_b = predicted[:, n, points[:, 1, 0], points[:, 1, 1]]
    return np.mean((depth_b < depth_a).astype(int) == np.asarray(closer)[None], axis=1)
