"""Logistic probes on 33 layers x 4000 examples x 1024 features: vlm_jax vs scikit-learn.

Synthetic features with a class signal that grows over layers (8 classes); 3000 examples
train, 1000 held out. vlm_jax fits every layer in one compiled call (fit_logistic with the
L2 strength that matches scikit-learn's C=1); scikit-learn fits 33 LogisticRegression(C=1)
models (lbfgs, tol 1e-4, each with its StandardScaler). Same machine, same run, the repeats of
the two alternating; the held-out accuracies are compared layer by layer before the times are
reported. Also reported: both solvers' L-BFGS iterations, and the FLOP floor of our fit: its
loss evaluations (two [N x D] x [D x C] products each) at the machine's best measured matmul
rate; the per-layer transposition and statistics (no FLOPs to speak of) are not in the floor.

    python benchmarks/probes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, matmul_peak  # noqa: E402


def data(layers=33, n=4000, d=1024, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((layers, n, d), dtype=np.float32)
    for layer in range(layers):
        X[layer] += (0.06 * layer / layers * rng.standard_normal((classes, d))).astype(np.float32)[y]
    return X, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vlm_jax.probe.linear import evaluate, fit_logistic

    X, y = data()
    train, test = slice(0, 3000), slice(3000, None)
    features = jax.device_put(X[:, train])  # the features as a JAX pipeline holds them

    def ours():
        probe = fit_logistic(features, y[train], lambdas=(1.0 / 3000,))
        jax.block_until_ready(probe.W)
        return probe

    def sklearn():
        models = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for layer in range(X.shape[0]):
                scaler = StandardScaler().fit(X[layer, train])
                models.append((scaler, LogisticRegression(C=1.0).fit(scaler.transform(X[layer, train]), y[train])))
        return models

    start = time.perf_counter()
    probe = ours()
    first = time.perf_counter() - start
    # the two alternate, so that both see the same drift of this shared machine's speed
    t_ours, t_sk = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        probe = ours()
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        models = sklearn()
        t_sk.append(time.perf_counter() - start)
    acc_ours = evaluate(probe, X[:, test], y[test]).accuracy
    acc_sk = np.array([(m.predict(s.transform(X[layer, test])) == y[test]).mean()
                       for layer, (s, m) in enumerate(models)])
    diff = np.abs(acc_ours - acc_sk)
    ours_med, sk_med = statistics.median(t_ours), statistics.median(t_sk)
    steps = np.asarray(probe.solver_steps)  # [L, 2] iterations, loss evaluations
    n_train, d = features.shape[1], features.shape[2]
    n_classes = int(y.max()) + 1
    peak = matmul_peak()["best"]
    floor = steps[:, 1].sum() * 2 * (2 * n_train * (d + 1) * n_classes) / peak
    print(f"machine: {machine()}")
    print(f"best float32 matmul: {peak / 1e9:.0f} GFLOP/s")
    print(f"L-BFGS iterations over the 33 layers: vlm_jax {steps[:, 0].sum()} ({steps[:, 1].sum()} loss evaluations), "
          f"scikit-learn {sum(int(m.n_iter_[0]) for _, m in models)}")
    print(f"vlm_jax FLOP floor {floor:.3f} s: the fit takes {ours_med / floor:.2f}x it")
    print("| fit | time (s, median) | held-out accuracy (mean over layers) |")
    print("|---|---|---|")
    print(f"| vlm_jax fit_logistic, 33 layers, one call | {ours_med:.2f} (first call incl. compile {first:.2f}) "
          f"| {acc_ours.mean():.4f} |")
    print(f"| scikit-learn, 33 x (StandardScaler + LogisticRegression) | {sk_med:.2f} | {acc_sk.mean():.4f} |")
    print(f"speed-up {sk_med / ours_med:.1f}x; held-out accuracy difference per layer: max {100 * diff.max():.1f} "
          f"points, mean {100 * diff.mean():.2f} points")


if __name__ == "__main__":
    main()
