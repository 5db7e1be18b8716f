"""Feature extraction, linear probes (vs scikit-learn), ridge, dense heads."""

from __future__ import annotations

import os
import threading
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import vlm_jax as vj
from vlm_jax.cli import main as cli_main
from vlm_jax.demo import draw_shape_image
from vlm_jax.probe.dense import fit_dense_heads, relative_depth_accuracy
from vlm_jax.probe.features import ExtractionError, FeatureStore, extract_features
from vlm_jax.probe.linear import (ProbeConvergenceWarning, ProbeDataError, _fit_logistic_layers, _transposed_layer,
                                  evaluate, fit_logistic, fit_ridge, r2_score)


def planted(n=600, layers=6, d=32, classes=4, signal_layer=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((layers, n, d)).astype(np.float32)
    W = rng.standard_normal((d, classes))
    y = np.argmax(X[signal_layer] @ W, axis=1)
    return X, y


def test_probes_recover_a_signal_planted_at_one_layer():
    X, y = planted()
    probe = fit_logistic(X[:, :450], y[:450])
    acc = evaluate(probe, X[:, 450:], y[450:]).accuracy
    # a separable signal, 450 training examples: ~0.9 on 150 test examples (0.90-0.91 depending on
    # which of two strengths tied on the held-out split is picked)
    assert acc[3] > 0.85
    assert np.all(np.delete(acc, 3) < 0.45)  # 4 classes: chance is ~0.25


@pytest.mark.parametrize("n", [24, 29, 5])  # whole blocks of 8 rows, a remainder of 5, fewer rows than a block
def test_transposed_layer_is_the_exact_transpose(n):
    import jax
    X = np.random.default_rng(0).standard_normal((3, n, 7)).astype(np.float32)
    for layer in range(3):
        XT = jax.jit(_transposed_layer)(jnp.asarray(X), layer)
        np.testing.assert_array_equal(np.asarray(XT), X[layer].T)


def test_one_call_fit_equals_single_fits():
    """Layers x folds x L2 strengths in one call == each fitted alone (float64, to convergence).

    In one call, each fold's strengths run as a warm-started path (strongest first, given here in
    the other order); alone, each fit starts from zero. The path must reach the same optima, in
    fewer iterations."""
    import jax

    X, y = planted(n=200, layers=3, d=16, signal_layer=1)
    lambdas = np.array([[1e-3, 1e-2]] * 3)
    weights = np.ones((2, 200))
    weights[0, :50] = 0.0  # two "folds"
    weights[1, 50:100] = 0.0
    with jax.enable_x64(True):
        args = dict(n_classes=4, max_iter=1000, tol=1e-10)
        W, b, _, _, counts = _fit_logistic_layers(jnp.asarray(X, jnp.float64), jnp.asarray(y), jnp.asarray(weights),
                                                  jnp.asarray(lambdas), **args)
        alone_iterations = np.zeros(2)  # per strength, over layers and folds
        for layer in range(3):
            for fold in range(2):
                for m in range(2):
                    W1, b1, _, _, counts1 = _fit_logistic_layers(
                        jnp.asarray(X[layer:layer + 1], jnp.float64), jnp.asarray(y),
                        jnp.asarray(weights[fold:fold + 1]), jnp.asarray(lambdas[layer:layer + 1, m:m + 1]), **args)
                    np.testing.assert_allclose(np.asarray(W[layer, fold, m]), np.asarray(W1[0, 0, 0]), atol=1e-5)
                    np.testing.assert_allclose(np.asarray(b[layer, fold, m]), np.asarray(b1[0, 0, 0]), atol=1e-5)
                    alone_iterations[m] += int(counts1[0, 0, 0, 0])
        path_iterations = np.asarray(counts)[..., 0].sum(axis=(0, 1))
        assert path_iterations[1] == alone_iterations[1]  # the strongest (1e-2) starts from zero either way
        # 1e-3 starts from 1e-2's solution: 757 against 845 iterations at this tight tolerance
        assert path_iterations[0] < 0.95 * alone_iterations[0]


def test_held_out_accuracy_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    n, d, classes = 1000, 64, 5
    y = rng.integers(0, classes, n)
    X = (rng.standard_normal((n, d)) + 1.2 * rng.standard_normal((classes, d))[y]).astype(np.float32)
    train, test = slice(0, 700), slice(700, None)
    probe = fit_logistic(X[None, train], y[train], lambdas=(1.0 / 700,))
    ours = evaluate(probe, X[None, test], y[test]).accuracy[0]
    scaler = StandardScaler().fit(X[train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(X[train]), y[train])
    theirs = (clf.predict(scaler.transform(X[test])) == y[test]).mean()
    assert abs(ours - theirs) <= 0.01
    assert ours > 0.8  # a separable task


def test_solver_steps_are_reported_and_max_iter_warns():
    X, y = planted(n=300, layers=3, d=16, signal_layer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeConvergenceWarning)  # converges well within the default
        probe = fit_logistic(X, y, lambdas=(1e-3,))
    steps = np.asarray(probe.solver_steps)
    assert steps.shape == (3, 2) and np.all(steps[:, 0] >= 1) and np.all(steps[:, 1] > steps[:, 0])
    with pytest.warns(ProbeConvergenceWarning, match=r"layers \[0, 1, 2\] stopped at max_iter=2"):
        short = fit_logistic(X, y, lambdas=(1e-3,), max_iter=2)
    assert np.all(np.asarray(short.solver_steps)[:, 0] == 2)
    chosen = fit_logistic(X, y, lambdas=(1e-4, 1e-2), folds=2)  # the refit's counts
    assert np.asarray(chosen.solver_steps).shape == (3, 2)


def test_lambda_selection_folds_and_reports():
    X, y = planted(n=400, layers=2, d=16, signal_layer=1)
    probe = fit_logistic(X, y, lambdas=(1e-4, 1e-2, 10.0), folds=3)
    assert probe.val_score.shape == (2, 3)
    assert float(probe.lam[1]) < 10.0  # the signal layer does not pick the crushing penalty
    report = evaluate(probe, X, y)
    assert report.confusion.shape == (2, 4, 4) and report.confusion[1].trace() == (probe.predict(X)[1] == y).sum()
    np.testing.assert_allclose(np.nanmean(report.per_class_accuracy[1]), np.mean(
        [np.mean(probe.predict(X)[1][y == c] == c) for c in range(4)]))
    assert "| 1 |" in report.table()


def test_ridge_matches_the_closed_form():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((2, 300, 10)).astype(np.float32)
    target = X[1] @ rng.standard_normal(10) + 0.01 * rng.standard_normal(300)
    probe = fit_ridge(X, target, lambdas=(1e-3,))
    r2 = r2_score(probe, X, target)
    assert r2[1] > 0.99 and r2[0] < 0.2
    Xs = (X[1] - X[1].mean(0)) / X[1].std(0)
    w = np.linalg.solve(Xs.T @ Xs / 300 + 1e-3 * np.eye(10), Xs.T @ (target - target.mean()) / 300)
    np.testing.assert_allclose(np.asarray(probe.W[1, :, 0]), w, rtol=1e-3, atol=1e-4)


def test_dense_depth_heads():
    rng = np.random.default_rng(3)
    n, layers, rows, cols, d = 64, 3, 4, 4, 8
    feats = rng.standard_normal((n, layers, rows * cols, d)).astype(np.float32)
    depth = (feats[:, 2] @ rng.standard_normal(d)).reshape(n, rows, cols)  # readable from layer 2 only
    heads = fit_dense_heads(feats, depth, kind="linear", epochs=60, learning_rate=3e-2)
    pred = heads.predict(feats)
    err = np.mean((pred - depth[None]) ** 2, axis=(1, 2, 3)) / depth.var()
    assert err[2] < 0.05 and err[0] > 0.5
    points = rng.integers(0, 4, (n, 2, 2))
    a = depth[np.arange(n), points[:, 0, 0], points[:, 0, 1]]
    b = depth[np.arange(n), points[:, 1, 0], points[:, 1, 1]]
    acc = relative_depth_accuracy(pred, points, (b < a).astype(int))
    assert acc[2] > 0.9
    conv = fit_dense_heads(feats, depth, kind="conv", hidden=8, epochs=20)
    assert conv.predict(feats).shape == (layers, n, rows, cols)


def test_probe_bad_inputs():
    X, y = planted(n=100, layers=2, d=8, signal_layer=1)
    with pytest.raises(ProbeDataError, match="100 examples but the labels have 99"):
        fit_logistic(X, y[:99])
    with pytest.raises(ProbeDataError, match="single class"):
        fit_logistic(X, np.zeros(100, int))
    bad = X.copy()
    bad[1, 5, 2] = np.nan
    with pytest.raises(ProbeDataError, match=r"NaN or inf values \(layers \[1\]\)"):
        fit_logistic(bad, y)
    with pytest.raises(ProbeDataError, match="NaN"):
        fit_ridge(bad, y.astype(np.float32))
    with pytest.raises(ProbeDataError, match="targets must be"):
        fit_dense_heads(np.zeros((4, 1, 4, 2), np.float32), np.zeros((4, 3, 3)))


@pytest.fixture(scope="module")
def toy(random_llava):
    return vj.load(random_llava, progress=False)


def _examples(n):
    return [{"prompt": "USER: <image>\nwhat is this ? ASSISTANT:", "images": [draw_shape_image(seed=i)],
             "position": -2, "region": {"image": 0, "box": (0, 0, 48, 48)}} for i in range(n)]


def test_extracted_features_match_direct_computation(toy, tmp_path):
    examples = _examples(5)
    store = extract_features(toy, examples, str(tmp_path / "f"), sites=("text.resid_post", "vision.resid_post"),
                             pooling=("image_mean", "last", "region_mean"), batch_size=2, progress=False)
    assert store.done == 5
    text = store.load("text.resid_post", "image_mean")
    assert text.shape == (5, 2, 64) and isinstance(text, np.memmap)
    for i in (0, 4):
        batch = toy.prepare(examples[i]["prompt"], images=examples[i]["images"])
        acts = toy.run(batch, capture=("text.resid_post", "vision.resid_post")).acts
        resid = np.asarray(acts["text.resid_post"])[:, 0]
        np.testing.assert_allclose(text[i], resid[:, batch.image_mask[0]].mean(1), atol=1e-5)
        np.testing.assert_allclose(store.load("text.resid_post", "last")[i], resid[:, -1], atol=1e-5)
        _, grid = batch.image_tokens.grid_positions(0)
        np.testing.assert_allclose(store.load("text.resid_post", "region_mean")[i],
                                   resid[:, grid[:2, :2].reshape(-1)].mean(1), atol=1e-5)
        vision = np.asarray(acts["vision.resid_post"])[:, 0]
        np.testing.assert_allclose(store.load("vision.resid_post", "region_mean")[i],
                                   vision[:, [1, 2, 5, 6]].mean(1), atol=1e-5)  # class token + 4x4 grid
    assert store.layers_first("text.resid_post", "image_mean").shape == (2, 5, 64)


def test_fused_attention_extraction_matches_the_explicit_path(toy, tmp_path):
    examples = _examples(3)
    kw = dict(sites=("text.resid_post", "vision.resid_post"), pooling=("image_mean", "last"), batch_size=2,
              progress=False)
    explicit = extract_features(toy, examples, str(tmp_path / "a"), fused_attention=False, **kw)
    fused = extract_features(toy, examples, str(tmp_path / "b"), fused_attention=True, **kw)
    for site, pooling in (("text.resid_post", "image_mean"), ("text.resid_post", "last"),
                          ("vision.resid_post", "image_mean")):
        np.testing.assert_allclose(fused.load(site, pooling), explicit.load(site, pooling), atol=1e-5, rtol=1e-5)


def test_prefetched_extraction_writes_the_same_features(toy, tmp_path):
    """The next batch's examples are read and processed on the prefetch thread while the model
    runs the current one: the arrays are the same, bit for bit, as without prefetching."""
    examples = _examples(5)
    readers = set()

    class Recorded:
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            readers.add(threading.current_thread() is threading.main_thread())
            return examples[i]

    kw = dict(sites=("text.resid_post", "vision.resid_post"), pooling=("image_mean", "last"), batch_size=2,
              progress=False)
    stores = {depth: extract_features(toy, Recorded(), str(tmp_path / str(depth)), prefetch=depth, **kw)
              for depth in (0, 2)}
    assert readers == {True, False}  # depth 0 read on this thread, depth 2 on the prefetch thread
    for site, pooling in (("text.resid_post", "image_mean"), ("text.resid_post", "last"),
                          ("vision.resid_post", "image_mean")):
        np.testing.assert_array_equal(stores[2].load(site, pooling), stores[0].load(site, pooling))
    with pytest.raises(ValueError, match="prefetch is how many batches to prepare ahead"):
        extract_features(toy, examples, str(tmp_path / "bad"), prefetch=-1, **kw)


def test_interrupted_extraction_resumes(toy, tmp_path):
    examples = _examples(6)
    whole = extract_features(toy, examples, str(tmp_path / "whole"), sites=("text.hidden_states",),
                             pooling=("last",), batch_size=2, progress=False)

    class Flaky:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise KeyboardInterrupt("stopped")
            return examples[i]

    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        extract_features(toy, Flaky(), out, sites=("text.hidden_states",), pooling=("last",), batch_size=2,
                         progress=False)
    assert FeatureStore(out).done == 4
    resumed = extract_features(toy, examples, out, sites=("text.hidden_states",), pooling=("last",), batch_size=2,
                               progress=False)
    np.testing.assert_array_equal(resumed.load("text.hidden_states", "last"), whole.load("text.hidden_states", "last"))
    with pytest.raises(ExtractionError, match="another extraction"):
        extract_features(toy, examples, out, sites=("text.resid_post",), pooling=("last",), progress=False)
    with pytest.raises(ExtractionError, match="applies to none of"):
        extract_features(toy, examples, str(tmp_path / "x"), sites=("vision.resid_post",), pooling=("last",),
                         progress=False)


def test_extract_and_probe_commands(toy, random_llava, tmp_path, capsys):
    import json

    rows = []
    for i in range(40):
        draw_shape_image(seed=i).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "USER: <image>\nwhat ? ASSISTANT:", "label": i % 2})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert cli_main(["extract", "--model", random_llava, "--data", str(tmp_path / "data.jsonl"), "--out",
                     str(tmp_path / "feat"), "--site", "text.resid_post", "--pooling", "image_mean"]) == 0
    assert os.path.exists(tmp_path / "feat" / "labels.npy")
    assert cli_main(["probe", "--features", str(tmp_path / "feat"), "--site", "text.resid_post", "--pooling",
                     "image_mean", "--out", str(tmp_path / "probe.json")]) == 0
    printed = capsys.readouterr().out
    assert "| layer | held-out accuracy |" in printed
    assert len(json.loads((tmp_path / "probe.json").read_text())["accuracy"]) == 2

    # bad input: an error that names the problem and the fix, exit status 2, no traceback
    def probe(*args):
        return cli_main(["probe", "--site", "text.resid_post", "--pooling", "image_mean", *args])

    assert probe("--features", str(tmp_path / "absent")) == 2
    assert "holds no extracted features" in capsys.readouterr().err
    assert probe("--features", str(tmp_path / "feat"), "--pooling", "last") == 2
    assert "it holds text.resid_post.image_mean" in capsys.readouterr().err
    assert probe("--features", str(tmp_path / "feat"), "--labels", str(tmp_path / "absent.npy")) == 2
    assert "Fix: pass --labels" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.arange(7) % 2)
    assert probe("--features", str(tmp_path / "feat"), "--labels", str(tmp_path / "short.npy")) == 2
    assert "holds 40 examples but the labels at" in capsys.readouterr().err
