"""Logistic probes on 33 layers x 4000 examples x 1024 features: vlm_jax vs scikit-learn.

Synthetic features with a class signal that grows over layers (8 classes); 3000 examples
train, 1000 held out. vlm_jax fits every layer in one compiled call (fit_logistic with the
L2 strength that matches scikit-learn's C=1); scikit-learn fits 33 LogisticRegression(C=1)
models (lbfgs, tol 1e-4, each with its StandardScaler). Same machine, same run, the repeats of
the two alternating; the held-out accuracies are compared layer by layer before the times are
reported. Also reported: both solvers' L-BFGS iterations, and the FLOP floor of our fit: its
loss evaluations (two [N x D] x [D x C] products each) at the machine's best measured matmul
rate; the per-layer transposition and statistics (no FLOPs to speak of) are not in the floor.

With --select, both libraries also pick the L2 strength per layer, as fit_logistic does by
default: five strengths fitted on a training split (80%) from the strongest to the weakest, each
warm-started from the previous one (LogisticRegressionCV's path), the best held-out accuracy
chosen per layer, then a refit on all training examples from zero.
scikit-learn runs this protocol on the same split, with C = 1 / (lambda * n) for each fit's n, so
that both minimise the same objectives.

With --no-kernel, vlm_jax evaluates the loss with XLA's products instead of its fused CPU kernel
(vlm_jax/probe/cpu_kernel.py), as on a machine without a C++ compiler.

    python benchmarks/probes.py [--repeats 3] [--select] [--no-kernel]
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
from common import best_of, machine, matmul_peak, peak_line, use_malloc_tunables  # noqa: E402


def data(layers=33, n=4000, d=1024, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((layers, n, d), dtype=np.float32)
    for layer in range(layers):
        X[layer] += (0.06 * layer / layers * rng.standard_normal((classes, d))).astype(np.float32)[y]
    return X, y


def main() -> None:
    use_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--select", action="store_true",
                        help="pick the L2 strength per layer among five (fit_logistic's default) in both libraries")
    parser.add_argument("--no-kernel", action="store_true",
                        help="evaluate with XLA's products, not the fused CPU kernel (VLM_JAX_CPU_KERNELS=0)")
    args = parser.parse_args()
    if args.no_kernel:
        os.environ["VLM_JAX_CPU_KERNELS"] = "0"

    import jax
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vlm_jax.probe.linear import DEFAULT_LAMBDAS, _kernel_applies, _splits, evaluate, fit_logistic

    X, y = data()
    n_train = 3000
    train, test = slice(0, n_train), slice(n_train, None)
    features = jax.device_put(X[:, train])  # the features as a JAX pipeline holds them
    lambdas = DEFAULT_LAMBDAS if args.select else (1.0 / n_train,)
    # the split fit_logistic makes (val_fraction 0.2, seed 0), so that scikit-learn sees the same one
    fit_part = _splits(n_train, y[train], 0.2, None, 0)[0] > 0

    def ours():
        probe = fit_logistic(features, y[train], lambdas=lambdas)
        jax.block_until_ready(probe.W)
        return probe

    def sklearn_layer(Xs, labels):
        """scikit-learn's fit of one standardised layer, with the strength picked like ours."""
        if len(lambdas) == 1:
            return LogisticRegression(C=1.0 / (lambdas[0] * len(labels))).fit(Xs, labels), lambdas[0]
        # the regularisation path of LogisticRegressionCV: strongest first, each fit warm-started from
        # the previous one; the refit on all examples starts from zero, as ours
        part, held = Xs[fit_part], Xs[~fit_part]
        model, scores = LogisticRegression(warm_start=True), {}
        for lam in sorted(lambdas, reverse=True):
            scores[lam] = model.set_params(C=1.0 / (lam * len(part))).fit(part, labels[fit_part]).score(
                held, labels[~fit_part])
        lam = lambdas[int(np.argmax([scores[lam] for lam in lambdas]))]  # the first (smallest) among ties, as ours
        return LogisticRegression(C=1.0 / (lam * len(labels))).fit(Xs, labels), lam

    def sklearn():
        models = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for layer in range(X.shape[0]):
                # ours standardises with all training examples' statistics, split or not
                scaler = StandardScaler().fit(X[layer, train])
                models.append((scaler, *sklearn_layer(scaler.transform(X[layer, train]), y[train])))
        return models

    matmul_probes = [matmul_peak()]  # and another after the timings: the floor uses the better
    start = time.perf_counter()
    probe = ours()
    first = time.perf_counter() - start
    # the two alternate, so that both see the same drift of this shared machine's speed. Each starts
    # after a pause: OpenBLAS's threads (scikit-learn's) spin for a while after their last product,
    # and took a core from the fit that followed them (0.37 s against 0.28 s after a pause)
    t_ours, t_sk = [], []
    for _ in range(args.repeats):
        time.sleep(0.5)
        start = time.perf_counter()
        probe = ours()
        t_ours.append(time.perf_counter() - start)
        time.sleep(0.5)
        start = time.perf_counter()
        models = sklearn()
        t_sk.append(time.perf_counter() - start)
    acc_ours = evaluate(probe, X[:, test], y[test]).accuracy
    acc_sk = np.array([(m.predict(s.transform(X[layer, test])) == y[test]).mean()
                       for layer, (s, m, _) in enumerate(models)])
    diff = np.abs(acc_ours - acc_sk)
    ours_med, sk_med = statistics.median(t_ours), statistics.median(t_sk)
    steps = np.asarray(probe.solver_steps)  # [L, 2] iterations, loss evaluations
    n_train, d = features.shape[1], features.shape[2]
    n_classes = int(y.max()) + 1
    matmul_probes.append(matmul_peak())
    peak = best_of(*matmul_probes)
    floor = steps[:, 1].sum() * 2 * (2 * n_train * (d + 1) * n_classes) / peak["best"]
    print(f"machine: {machine()}")
    print(peak_line(peak, matmul_probes))
    path = "the fused CPU kernel" if _kernel_applies(features) else "XLA's products"
    print(f"vlm_jax evaluates the loss and gradient with {path}")
    print(f"L-BFGS iterations over the 33 layers' final fits: vlm_jax {steps[:, 0].sum()} ({steps[:, 1].sum()} loss "
          f"evaluations), scikit-learn {sum(int(m.n_iter_[0]) for _, m, _ in models)}")
    if args.select:
        same = np.isclose(np.asarray(probe.lam), [lam for _, _, lam in models])
        print(f"strengths {lambdas}: the two libraries picked the same one for {same.sum()} of {len(same)} layers")
    else:  # with --select, the selection fits' evaluations are not reported, so there is no floor
        print(f"vlm_jax FLOP floor {floor:.3f} s: the fit takes {ours_med / floor:.2f}x it")
    sk_fits = f"{len(lambdas)} split fits + refit" if args.select else "LogisticRegression"
    print("| fit | time (s, median) | held-out accuracy (mean over layers) |")
    print("|---|---|---|")
    print(f"| vlm_jax fit_logistic, 33 layers, {len(lambdas)} strength(s), one call | {ours_med:.2f} (first call incl. "
          f"compile {first:.2f}) | {acc_ours.mean():.4f} |")
    print(f"| scikit-learn, 33 x (StandardScaler + {sk_fits}) | {sk_med:.2f} | {acc_sk.mean():.4f} |")
    print(f"speed-up {sk_med / ours_med:.1f}x; held-out accuracy difference per layer: max {100 * diff.max():.1f} "
          f"points, mean {100 * diff.mean():.2f} points")


if __name__ == "__main__":
    main()
