"""Linear probes for every layer at once: logistic (softmax) and ridge regression.

Features come stacked over layers, X [L, N, D]. Each layer's probe is fitted on standardised
features (train-split mean and std); an L2 strength is picked per layer on held-out data
(a validation split, or k folds), then the probe is refitted on all training data.

Logistic probes minimise  mean cross-entropy + lambda / 2 * ||W||^2  (intercept not
penalised; scikit-learn's C corresponds to lambda = 1 / (C * N)) with L-BFGS (probe/lbfgs.py). Layers
run one after another inside one compiled call (lax.map), which keeps a layer's features in
cache across all of its fits. On CPU, each float32 fit is one call of a C++ kernel that runs the same
L-BFGS around fused loss evaluations (probe/cpu_kernel.py); elsewhere lbfgs.minimize runs with
XLA's products on a transposed copy of each layer.
Within a layer, each fold's strengths are fitted from the strongest to the weakest, each starting
from the previous solution (the path of scikit-learn's LogisticRegressionCV); the refit on all
training data starts from zero.
Ridge probes are solved in closed form from one eigendecomposition per layer.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from vlm_jax.errors import InputError
from vlm_jax.probe import cpu_kernel, lbfgs

DEFAULT_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class ProbeDataError(InputError):
    """Features or labels a probe cannot be fitted on."""


class ProbeConvergenceWarning(UserWarning):
    """A logistic probe's L-BFGS stopped at max_iter before its gradient fell below tol."""


def check_features(X, y=None, *, classification: bool = True, name: str = "X") -> tuple[np.ndarray, np.ndarray | None]:
    """Validates X [L, N, D] (or [N, D]) and labels y [N] / [N, K]; returns them as arrays."""
    X = np.asarray(X)
    if X.ndim == 2:
        X = X[None]
    if X.ndim != 3:
        raise ProbeDataError(f"{name} must be [layers, examples, features] or [examples, features]; got {X.shape}")
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ProbeDataError(f"{name} holds NaN or inf values (first at layer {bad[0]}, example {bad[1]}, feature "
                             f"{bad[2]}). Fix: drop those examples or re-extract the features.")
    if y is None:
        return X, None
    y = np.asarray(y)
    if y.shape[0] != X.shape[1]:
        raise ProbeDataError(f"{name} has {X.shape[1]} examples but the labels have {y.shape[0]}; they must match.")
    if classification:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ProbeDataError(f"classification labels must be integers [N]; got {y.dtype} {y.shape}")
        if len(np.unique(y)) < 2:
            raise ProbeDataError(f"the labels hold a single class ({np.unique(y)}); a probe needs at least two.")
        if y.min() < 0:
            raise ProbeDataError("class labels must be >= 0")
    elif not np.all(np.isfinite(y)):
        raise ProbeDataError("regression targets hold NaN or inf values")
    return X, y


@flax.struct.dataclass
class Standardizer:
    mean: jax.Array  # [L, D]
    scale: jax.Array  # [L, D]

    @classmethod
    def fit(cls, X: jax.Array) -> "Standardizer":
        mean = jnp.mean(X, axis=1)
        std = jnp.std(X, axis=1)
        return cls(mean, jnp.where(std > 1e-8, std, 1.0))

    def __call__(self, X: jax.Array) -> jax.Array:
        return (X - self.mean[:, None]) / self.scale[:, None]


# ---------------------------------------------------------------------------------------------
# logistic


def _xla_data_term(XT, YT, share):
    """The data term from XLA's products: (W' [D, C], bias [C]) -> (loss [], X^T G [D, C], sum_n G [C]).

    XT [D, N] the raw features transposed, YT [C, N] one-hot labels transposed, share [N]. Both
    products read X^T as a plain row-major operand: logits^T = W'^T X^T and the gradient X^T G^T.
    """

    def data_term(W_raw, bias):
        logits_t = W_raw.T @ XT + bias[:, None]  # [C, N]
        logp = jax.nn.log_softmax(logits_t, axis=0)
        loss = -jnp.sum(share * jnp.sum(YT * logp, axis=0))
        G = (jnp.exp(logp) - YT) * share[None, :]  # d loss / d logits, [C, N]
        return loss, XT @ G.T, jnp.sum(G, axis=1)

    return data_term


def _fit_logistic_one(data_term, d, n_classes, mean, scale, lam, W0, b0, max_iter: int, tol: float):
    """One softmax regression on standardised features, without materialising them.

    data_term(W' [D, C], bias [C]) -> (loss [], X^T G [D, C], sum_n G [C]) evaluates the mean
    cross-entropy of logits W'^T x_n + bias on the raw features x_n, weighted by the fold's
    example shares (summing to 1), with G = d loss / d logits. mean/scale [D] are the
    standardisation, lam [] the L2 strength, W0 [D, C], b0 [C] the starting point. Returns
    W [D, C], b [C] (for standardised features) and the solver's [iterations, loss evaluations]
    [2], minimising
    sum(share * CE) + lam / 2 ||W||^2 (intercept not penalised).
    The standardisation is folded into the weights: W' = W / scale, bias = b - (mean / scale) W.
    """
    shift = mean / scale

    def value_and_grad(x):
        W, b = x[: d * n_classes].reshape(d, n_classes), x[d * n_classes:]
        loss, gx, g_b = data_term(W / scale[:, None], b - shift @ W)
        value = loss + 0.5 * lam * jnp.sum(jnp.square(W))
        g_W = gx / scale[:, None] - shift[:, None] * g_b[None, :] + lam * W
        return value, jnp.concatenate([g_W.reshape(-1), g_b])

    x0 = jnp.concatenate([W0.reshape(-1), b0]).astype(mean.dtype)
    x, iterations, evaluations = lbfgs.minimize(value_and_grad, x0, max_iter=max_iter, tol=tol)
    return x[: d * n_classes].reshape(d, n_classes), x[d * n_classes:], jnp.stack([iterations, evaluations])


@functools.partial(jax.jit, static_argnames=("n_classes", "max_iter", "use_kernel"))
def _fit_logistic_layers(X, y, weights, lambdas, n_classes: int, max_iter: int, tol: float, use_kernel: bool = False):
    """X [L, N, D] raw features; weights [F, N] (one row per fold/split); lambdas [L, M].

    Standardises each layer (statistics of all N examples), fits every (fold, strength) pair,
    and returns (W [L, F, M, D, C], b [L, F, M, C] for standardised features, mean [L, D],
    scale [L, D], counts [L, F, M, 2]: each fit's L-BFGS iterations and loss evaluations).
    Layers run one after another (lax.map), so a layer's features stay in cache across all of
    its fits. Within a fold, the strengths run from the strongest to the weakest, each fit starting
    from the previous one's solution (a regularisation path): a warm start needs fewer
    iterations, and one unbatched fit at a time avoids what a vmapped while loop costs (it
    selects its whole state on every iteration, and runs every fit until the slowest is done).
    use_kernel (float32 on CPU): each fit is one call of the CPU kernel (cpu_kernel.logistic_fit:
    the same L-BFGS, evaluating on X itself); otherwise lbfgs.minimize with XLA's products on a
    transposed copy of each layer.
    """
    dtype = jnp.promote_types(X.dtype, jnp.float32)  # float64 inputs (with jax x64) stay float64
    X = X.astype(dtype)
    d = X.shape[2]
    YT = None if use_kernel else jax.nn.one_hot(y, n_classes, dtype=dtype).T

    def one_layer(xs):
        layer, lam = xs
        if use_kernel:
            mean, std = cpu_kernel.column_moments(X, layer)
        else:
            XT = _transposed_layer(X, layer)
            # statistics from X^T's rows: contiguous reductions over a block that is already in cache
            mean, std = jnp.mean(XT, axis=1), jnp.std(XT, axis=1)
        scale = jnp.where(std > 1e-8, std, 1.0)
        strongest_first = jnp.argsort(-lam)
        back = jnp.argsort(strongest_first)  # from the path's order to lam's

        def path(fold_weights):  # -> W [M, D, C], b [M, C], counts [M, 2], in the order of lam
            share = fold_weights / jnp.sum(fold_weights)
            if use_kernel:  # the whole fit in one call: the same L-BFGS, without XLA's per-op cost
                def fit(lam_m, W0, b0):
                    return cpu_kernel.logistic_fit(X, layer, y, share, mean, scale, lam_m, W0, b0, tol,
                                                   max_iter=max_iter)
            else:
                fit = functools.partial(_fit_logistic_one, _xla_data_term(XT, YT, share), d, n_classes, mean, scale,
                                        max_iter=max_iter, tol=tol)

            def next_strength(start, lam_m):
                W, b, counts = fit(lam_m, *start)
                return (W, b), (W, b, counts)

            start = (jnp.zeros((d, n_classes), dtype), jnp.zeros((n_classes,), dtype))
            _, (W, b, counts) = jax.lax.scan(next_strength, start, lam[strongest_first])
            return W[back], b[back], counts[back]

        W, b, counts = jax.lax.map(path, weights)
        return W, b, mean, scale, counts

    return jax.lax.map(one_layer, (jnp.arange(X.shape[0]), lambdas))


def _transposed_layer(X, layer, rows: int = 8):
    """X[layer]^T [D, N] of X [L, N, D], the only copy of a layer's features that the fit reads.

    Why like this (measured on XLA CPU, N=3000, D=1024, 33 layers): a dot that contracts X's
    example axis transposes X on every call (~15x a plain matmul), so X^T is made once per layer,
    and both products of an iteration use it. A loop moves `rows` examples at a time: each slice
    of X is read once, transposed while it sits in L1, and written into its columns of X^T in
    place. Transposing 8 large blocks and joining them (the previous version) took ~12 ms per
    layer; with this loop a whole 33-layer call with max_iter=0 (transpositions, statistics, one
    evaluation) went from 0.48 s to 0.14 s. Unrolling hundreds of small blocks is nearly as fast
    (0.16-0.18 s) but costs seconds of compile time (see benchmarks/RESULTS.md).
    """
    n, d = X.shape[1], X.shape[2]
    rows = min(rows, n)

    def move_block(i, XT):
        start = jnp.minimum(i * rows, n - rows)  # when rows does not divide n, the last block overlaps
        block = jax.lax.dynamic_slice(X, (layer, start, 0), (1, rows, d))[0]
        return jax.lax.dynamic_update_slice(XT, block.T, (0, start))

    return jax.lax.fori_loop(0, -(-n // rows), move_block, jnp.zeros((d, n), X.dtype))


@flax.struct.dataclass
class LinearProbe:
    """Probes for L layers: W [L, D, C], b [L, C] on standardised features."""

    W: jax.Array
    b: jax.Array
    standardizer: Standardizer
    lam: jax.Array  # [L] chosen L2 strength
    val_score: jax.Array  # [L, M] held-out accuracy (or R^2) of every candidate strength
    lambdas: jax.Array  # [M]
    # [L, 2]: L-BFGS iterations and loss evaluations of each layer's final fit (logistic only)
    solver_steps: jax.Array | None = None
    kind: str = flax.struct.field(pytree_node=False, default="logistic")

    def decision(self, X) -> jax.Array:
        """Scores [L, N, C] (logits for logistic probes, predictions for ridge)."""
        Xs = self.standardizer(jnp.asarray(X, jnp.float32))
        return jnp.einsum("lnd,ldc->lnc", Xs, self.W) + self.b[:, None]

    def predict(self, X) -> np.ndarray:
        """Class ids [L, N] (logistic) or predictions [L, N, K] (ridge)."""
        scores = self.decision(X)
        return np.asarray(jnp.argmax(scores, -1) if self.kind == "logistic" else scores)


def _splits(n: int, y: np.ndarray | None, val_fraction: float, folds: int | None, seed: int) -> np.ndarray:
    """Training weights [F, N]: 1 on each split's training examples, 0 on its held-out ones."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if folds:
        if folds < 2:
            raise ProbeDataError("folds must be >= 2")
        parts = np.array_split(order, folds)
        weights = np.ones((folds, n), np.float32)
        for f, part in enumerate(parts):
            weights[f, part] = 0.0
        return weights
    n_val = max(1, int(round(val_fraction * n)))
    weights = np.ones((1, n), np.float32)
    weights[0, order[:n_val]] = 0.0
    return weights


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _held_out_accuracy(X, y, W, b, held_out, mean, scale, n_classes):
    """[L, M] accuracy of every (fold, strength) fit on its held-out examples, pooled over folds."""
    Xs = (X.astype(jnp.float32) - mean[:, None]) / scale[:, None]
    scores = jnp.einsum("lnd,lfmdc->lfmnc", Xs, W) + b[:, :, :, None]
    correct = (jnp.argmax(scores, -1) == y) * held_out[None, :, None, :]
    return jnp.sum(correct, axis=(1, 3)) / jnp.sum(held_out)


def _check_finite_stats(mean, scale, name="X"):
    bad = ~(np.isfinite(np.asarray(mean)).all(axis=1) & np.isfinite(np.asarray(scale)).all(axis=1))
    if bad.any():
        raise ProbeDataError(f"{name} holds NaN or inf values (layers {np.nonzero(bad)[0].tolist()}). Fix: drop "
                             "those examples or re-extract the features.")


def _kernel_applies(X: jax.Array) -> bool:
    """Whether probes on X use the fused CPU kernel: float32 (or narrower) features on CPU devices,
    and the kernel builds on this machine (probe/cpu_kernel.py)."""
    if jnp.promote_types(X.dtype, jnp.float32) != jnp.float32:
        return False
    if any(device.platform != "cpu" for device in X.devices()):
        return False
    return cpu_kernel.available()


def fit_logistic(X, y, *, lambdas=DEFAULT_LAMBDAS, X_val=None, y_val=None, val_fraction: float = 0.2,
                 folds: int | None = None, num_classes: int | None = None, max_iter: int = 200, tol: float = 1e-4,
                 seed: int = 0, refit: bool = True) -> LinearProbe:
    """Softmax-regression probes for every layer of X [L, N, D] (numpy, memmap or jax) with
    integer labels y [N].

    The L2 strength is chosen per layer by held-out accuracy: on (X_val, y_val) if given, else
    on `folds` folds of the training data, else on a `val_fraction` split; then (refit=True) the
    probe is refitted on all of X with the chosen strength. With a single strength nothing is
    held out: it is fitted on all of X directly.
    """
    shape = tuple(X.shape)
    if len(shape) == 2:
        X = X[None]
        shape = (1, *shape)
    if len(shape) != 3:
        raise ProbeDataError(f"X must be [layers, examples, features] or [examples, features]; got {shape}")
    _, y = check_features(np.empty((1, shape[1], 0), np.float32), y)  # labels only; X is checked on device
    n_classes = int(num_classes or (y.max() + 1))
    if y.max() >= n_classes:
        raise ProbeDataError(f"label {y.max()} >= num_classes {n_classes}")
    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    lambdas = np.asarray(lambdas, np.float32).reshape(-1)
    n_layers, n = shape[:2]

    use_kernel = _kernel_applies(Xj)

    def fit(weights, lam):  # -> W [L, F, M, D, C], b [L, F, M, C], mean, scale, counts [L, F, M, 2]
        return _fit_logistic_layers(Xj, yj, jnp.asarray(weights, jnp.float32), jnp.asarray(lam), n_classes,
                                    max_iter, tol, use_kernel)

    everything = np.ones((1, n), np.float32)
    if len(lambdas) == 1:
        chosen = np.full(n_layers, lambdas[0], np.float32)
        W, b, mean, scale, counts = fit(everything, chosen[:, None])
        _check_finite_stats(mean, scale)
        W, b, counts = W[:, 0, 0], b[:, 0, 0], counts[:, 0, 0]
        val_score = jnp.full((n_layers, 1), jnp.nan)
    else:
        if X_val is not None:
            X_val, y_val = check_features(X_val, y_val, name="X_val")
            W_all, b_all, mean, scale, counts_all = fit(everything, np.tile(lambdas, (n_layers, 1)))
            _check_finite_stats(mean, scale)
            val_score = _held_out_accuracy(jnp.asarray(X_val), jnp.asarray(y_val), W_all, b_all,
                                           jnp.ones((1, len(y_val))), mean, scale, n_classes)
        else:
            weights = _splits(n, y, val_fraction, folds, seed)
            W_all, b_all, mean, scale, counts_all = fit(weights, np.tile(lambdas, (n_layers, 1)))
            _check_finite_stats(mean, scale)
            val_score = _held_out_accuracy(Xj, yj, W_all, b_all, jnp.asarray(1.0 - weights), mean, scale, n_classes)
        best = np.asarray(jnp.argmax(val_score, axis=1))  # first (smallest) strength among ties
        chosen = lambdas[best]
        if refit or X_val is None:
            # from zero: starting from the chosen held-out fit took more iterations on the benchmark's
            # features (433 against 414 iterations over 33 layers)
            W, b, _, _, counts = fit(everything, chosen[:, None])
            W, b, counts = W[:, 0, 0], b[:, 0, 0], counts[:, 0, 0]
        else:
            rows = np.arange(n_layers)
            W, b, counts = W_all[rows, 0, best], b_all[rows, 0, best], counts_all[rows, 0, best]
    stopped = np.nonzero(np.asarray(counts[:, 0]) >= max_iter)[0]
    if len(stopped):
        warnings.warn(f"the logistic probes of layers {stopped.tolist()} stopped at max_iter={max_iter} before the "
                      f"largest gradient entry fell below tol={tol}. Fix: raise max_iter, or loosen tol.",
                      ProbeConvergenceWarning, stacklevel=2)
    return LinearProbe(W, b, Standardizer(mean, scale), jnp.asarray(chosen), val_score, jnp.asarray(lambdas),
                       solver_steps=counts, kind="logistic")


# ---------------------------------------------------------------------------------------------
# ridge


@jax.jit
def _ridge_layers(Xs, Y, lambdas):
    """Closed-form ridge per layer: Xs [L, N, D] standardised, Y [N, K] centred, lambdas [M].

    Minimises mean ||X W - Y||^2 / 2 + lambda / 2 ||W||^2, for every lambda from one
    eigendecomposition of X^T X / N. Returns W [L, M, D, K].
    """
    n = Xs.shape[1]

    def one(X):
        evals, evecs = jnp.linalg.eigh(X.T @ X / n)
        proj = evecs.T @ (X.T @ Y / n)  # [D, K]
        return jax.vmap(lambda lam: evecs @ (proj / (evals + lam)[:, None]))(lambdas)

    return jax.lax.map(one, Xs)


def fit_ridge(X, y, *, lambdas=DEFAULT_LAMBDAS, X_val=None, y_val=None, val_fraction: float = 0.2,
              seed: int = 0) -> LinearProbe:
    """Ridge-regression probes for every layer of X [L, N, D], targets y [N] or [N, K];
    the strength is picked per layer by held-out R^2, then refitted on all data."""
    X, y = check_features(X, y, classification=False)
    y2 = np.asarray(y, np.float32).reshape(len(y), -1)
    lambdas = jnp.asarray(lambdas, jnp.float32)
    if X_val is None:
        order = np.random.default_rng(seed).permutation(X.shape[1])
        n_val = max(1, int(round(val_fraction * X.shape[1])))
        val, train = order[:n_val], order[n_val:]
        X_tr, y_tr, X_va, y_va = X[:, train], y2[train], X[:, val], y2[val]
    else:
        X_va, y_va = check_features(X_val, y_val, classification=False, name="X_val")
        X_tr, y_tr, y_va = X, y2, np.asarray(y_va, np.float32).reshape(len(y_va), -1)

    def fit(X_fit, y_fit):
        Xj = jnp.asarray(X_fit, jnp.float32)
        st = Standardizer.fit(Xj)
        mean_y = jnp.mean(jnp.asarray(y_fit), axis=0)
        return st, mean_y, _ridge_layers(st(Xj), jnp.asarray(y_fit) - mean_y, lambdas)

    st, mean_y, W = fit(X_tr, y_tr)
    pred = jnp.einsum("lnd,lmdk->lmnk", st(jnp.asarray(X_va, jnp.float32)), W) + mean_y
    resid = jnp.sum(jnp.square(pred - jnp.asarray(y_va)), axis=(2, 3))
    total = jnp.sum(jnp.square(jnp.asarray(y_va) - jnp.mean(jnp.asarray(y_va), axis=0)))
    val_score = 1.0 - resid / total  # R^2 [L, M]
    best = jnp.argmax(val_score, axis=1)
    st, mean_y, W = fit(X, y2)
    W = jnp.take_along_axis(W, best[:, None, None, None], axis=1)[:, 0]
    b = jnp.broadcast_to(mean_y, (X.shape[0], y2.shape[1]))
    return LinearProbe(W, b, st, lambdas[best], val_score, lambdas, kind="ridge")


# ---------------------------------------------------------------------------------------------
# reports


@dataclass
class ProbeReport:
    accuracy: np.ndarray  # [L]
    per_class_accuracy: np.ndarray  # [L, C] (NaN for classes absent from the test set)
    confusion: np.ndarray  # [L, C, C] rows: true class, columns: predicted

    def table(self, first_layer: int = 0) -> str:
        lines = ["| layer | accuracy |", "|---|---|"]
        lines += [f"| {first_layer + i} | {a:.3f} |" for i, a in enumerate(self.accuracy)]
        return "\n".join(lines)


def evaluate(probe: LinearProbe, X, y) -> ProbeReport:
    """Accuracy, per-class accuracy and confusion matrices of classification probes."""
    X, y = check_features(X, y, name="X_test")
    n_classes = probe.W.shape[-1]
    pred = probe.predict(X)  # [L, N]
    confusion = np.zeros((pred.shape[0], n_classes, n_classes), np.int64)
    for layer in range(pred.shape[0]):
        np.add.at(confusion[layer], (y, pred[layer]), 1)
    support = confusion.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diagonal(confusion, axis1=1, axis2=2) / support
    return ProbeReport(np.mean(pred == y[None], axis=1), per_class, confusion)


def r2_score(probe: LinearProbe, X, y) -> np.ndarray:
    """[L] coefficient of determination of ridge probes."""
    X, y = check_features(X, y, classification=False, name="X_test")
    y2 = np.asarray(y, np.float64).reshape(len(y), -1)
    pred = np.asarray(probe.predict(X), np.float64)
    return 1.0 - np.sum((pred - y2) ** 2, axis=(1, 2)) / np.sum((y2 - y2.mean(0)) ** 2)
