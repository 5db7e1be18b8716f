"""`vlm-jax` command line: demo, convert, export, generate, lens, extract, probe, finetune."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None):
    if name is None:
        return None
    import jax.numpy as jnp

    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


def _sharding(args):
    """--distributed starts jax.distributed (multi-host); --mesh splits the model over devices."""
    from vlm_jax import sharding

    if getattr(args, "distributed", False):
        sharding.initialize_distributed()
    return sharding.parse_mesh(args.mesh) if getattr(args, "mesh", None) else None


def _default_out(source: str) -> str:
    name = os.path.basename(os.path.normpath(source)).replace("/", "--") or "model"
    return os.path.join("checkpoints", f"{name}-vlm_jax")


def cmd_convert(args) -> int:
    import vlm_jax as vj

    out = args.out or _default_out(args.source)
    start = time.perf_counter()
    model = vj.load(args.source, dtype=_dtype(args.dtype))
    path = model.save(out, force=args.force)
    print(f"converted {args.source} -> {path} ({model.num_params / 1e6:.1f}M params, {model.dtype}, "
          f"{time.perf_counter() - start:.1f}s)")
    return 0


def cmd_export(args) -> int:
    import vlm_jax as vj

    model = vj.load(args.checkpoint)
    path = model.export_hf(args.out, force=args.force, dtype=_dtype(args.dtype))
    print(f"exported {args.checkpoint} -> {path} (transformers folder)")
    return 0


def _open_image(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


def cmd_generate(args) -> int:
    import vlm_jax as vj

    model = vj.load(args.model, dtype=_dtype(args.dtype), sharding=_sharding(args))
    images = [_open_image(p) for p in args.image]
    batch = _prepare(model, images, args.prompt, args.chat)
    result = model.generate(batch, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(result.texts[0] if result.texts else result.tokens[0].tolist())
    return 0


def _prepare(model, images, prompt: str, chat: bool):
    if chat:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        return model.prepare(conversation=[{"role": "user", "content": content}], images=images or None)
    if images and "<image>" not in prompt:
        prompt = "<image>\n" * len(images) + prompt
    return model.prepare(prompt, images=images or None)


def cmd_lens(args) -> int:
    import vlm_jax as vj
    from vlm_jax.interp.lens_report import lens_table, patch_lens, plot_patch_lens

    model = vj.load(args.model, dtype=_dtype(args.dtype), sharding=_sharding(args))
    images = [_open_image(p) for p in args.image]
    batch = _prepare(model, images, args.prompt, args.chat)
    lens = patch_lens(model, batch, image=args.image_index, k=args.k)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_patch_lens(lens, args.out, layers, title=f"logit lens: {os.path.basename(args.image[args.image_index])}")
    print(lens_table(lens, layers))
    print(f"wrote {args.out}")
    return 0


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_extract(args) -> int:
    import numpy as np

    import vlm_jax as vj
    from vlm_jax.probe.features import extract_features

    model = vj.load(args.model, dtype=_dtype(args.dtype), sharding=_sharding(args))
    rows = _read_jsonl(args.data)
    base = os.path.dirname(os.path.abspath(args.data))

    class Examples:  # images are opened lazily, batch by batch (on the prefetch thread)
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = dict(rows[i])
            paths = row.get("images", row.get("image", []))
            paths = [paths] if isinstance(paths, str) else paths
            row["images"] = [_open_image(os.path.join(base, p)) for p in paths]
            return row

    store = extract_features(model, Examples(), args.out, sites=tuple(args.site), pooling=tuple(args.pooling),
                             batch_size=args.batch_size, dtype=args.store_dtype, prefetch=args.prefetch)
    if all("label" in r for r in rows):
        np.save(os.path.join(args.out, "labels.npy"), np.asarray([r["label"] for r in rows]))
    print(f"features of {store.done} examples in {args.out}: {', '.join(store.meta['shapes'])}")
    return 0


def cmd_probe(args) -> int:
    import numpy as np

    from vlm_jax.probe.features import FeatureStore
    from vlm_jax.probe.linear import ProbeDataError, evaluate, fit_logistic, fit_ridge, r2_score

    store = FeatureStore(args.features)
    X = store.layers_first(args.site, args.pooling)
    labels_path = args.labels or os.path.join(args.features, "labels.npy")
    if not os.path.exists(labels_path):
        raise ProbeDataError(f"no labels at {labels_path} (extract writes labels.npy only when every dataset row has "
                             "a 'label'). Fix: pass --labels FILE.npy with one label per example.")
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape[:1] != X.shape[1:2]:
        raise ProbeDataError(f"{args.features} holds {X.shape[1]} examples but the labels at {labels_path} have "
                             f"{labels.shape[0] if labels.ndim else 0}. Fix: pass --labels with one label per "
                             "example, in the dataset's order.")
    order = np.random.default_rng(args.seed).permutation(len(labels))
    n_test = int(round(args.test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    lambdas = tuple(args.lambdas)
    if args.kind == "logistic":
        probe = fit_logistic(X[:, train], labels[train], lambdas=lambdas, folds=args.folds, seed=args.seed)
        scores = evaluate(probe, X[:, test], labels[test]).accuracy
        metric = "accuracy"
    else:
        probe = fit_ridge(X[:, train], labels[train].astype(np.float32), lambdas=lambdas, seed=args.seed)
        scores = r2_score(probe, X[:, test], labels[test])
        metric = "r2"
    print(f"| layer | held-out {metric} | L2 strength |")
    print("|---|---|---|")
    for layer, (score, lam) in enumerate(zip(scores, np.asarray(probe.lam))):
        print(f"| {layer} | {score:.3f} | {lam:.0e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"site": args.site, "pooling": args.pooling, "kind": args.kind, metric: scores.tolist(),
                       "lambda": np.asarray(probe.lam).tolist(), "n_train": len(train), "n_test": len(test)}, f,
                      indent=2)
    return 0


def cmd_finetune(args) -> int:
    from vlm_jax.train import Trainer, load_config

    config = load_config(args.config)
    if args.no_resume:
        config.resume = False
    if args.distributed:
        from vlm_jax.sharding import initialize_distributed

        initialize_distributed()
    if args.mesh:
        config.mesh = args.mesh
    result = Trainer(config).run()
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    print(f"trained {result.steps} steps (final loss {last:.4f}); checkpoints in {result.checkpoint_dir}")
    if result.eval:
        print(f"held-out: {result.eval[max(result.eval)]}")
    if result.export_dir:
        print(f"exported to {result.export_dir}")
    return 0


def cmd_demo(args) -> int:
    from vlm_jax.demo import run_demo

    run_demo(args.workdir, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    scale = argparse.ArgumentParser(add_help=False)
    scale.add_argument("--mesh", help="run sharded, e.g. 'fsdp=4,tensor=2' (data takes the remaining devices)")
    scale.add_argument("--distributed", action="store_true",
                       help="multi-host: call jax.distributed.initialize() first (Cloud TPU pods)")

    p = sub.add_parser("demo", help="make a small random LLaVA, convert it, generate, print a logit-lens table")
    p.add_argument("--workdir", default="checkpoints", help="where the demo checkpoints go")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("convert", help="HF folder or hub id -> vlm_jax (orbax) checkpoint")
    p.add_argument("source", help="hub id or transformers folder")
    p.add_argument("out", nargs="?", help="output folder (default checkpoints/<name>-vlm_jax)")
    p.add_argument("--dtype", help="parameter dtype (float32, bfloat16, float16); default: as stored")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="vlm_jax checkpoint -> transformers folder")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", help="dtype of the written tensors; default: as loaded")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("generate", parents=[scale], help="generate text for an image and a prompt")
    p.add_argument("--model", required=True, help="hub id, transformers folder or vlm_jax checkpoint")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="prompt; with --chat the user message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("lens", parents=[scale], help="logit lens of every patch of an image: PNG + text table")
    p.add_argument("--model", required=True, help="hub id, transformers folder or vlm_jax checkpoint")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--image-index", type=int, default=0, help="which image's patches to show")
    p.add_argument("--layers", help="comma-separated layers to plot (default: up to 8, evenly spaced)")
    p.add_argument("--k", type=int, default=3, help="top tokens listed for the last position")
    p.add_argument("--out", default="lens.png", help="PNG path")
    p.add_argument("--dtype")
    p.set_defaults(fn=cmd_lens)

    p = sub.add_parser("extract", parents=[scale], help="pooled features of a JSONL dataset at chosen sites, written to disk")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL: {image(s), prompt, [label], [region], [position]} per line")
    p.add_argument("--out", required=True, help="feature folder (resumed if it exists)")
    p.add_argument("--site", action="append", default=[], help="capture site (repeat), e.g. text.resid_post")
    p.add_argument("--pooling", action="append", default=[], help="image_mean | cls | last | position | "
                   "region_mean | grid (repeat)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=1, help="batches read and processed ahead on a background "
                   "thread while the model runs (0: none)")
    p.add_argument("--store-dtype", default="float32", help="on-disk dtype (float32 or float16)")
    p.add_argument("--dtype")
    p.set_defaults(fn=cmd_extract)

    p = sub.add_parser("probe", help="linear probes on every layer of extracted features")
    p.add_argument("--features", required=True, help="a folder written by `vlm-jax extract`")
    p.add_argument("--site", required=True)
    p.add_argument("--pooling", required=True)
    p.add_argument("--labels", help=".npy labels (default: labels.npy in the feature folder)")
    p.add_argument("--kind", choices=("logistic", "ridge"), default="logistic")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--folds", type=int, help="pick the L2 strength by k-fold cross-validation")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the per-layer results as JSON")
    p.set_defaults(fn=cmd_probe)

    p = sub.add_parser("finetune", parents=[scale], help="finetune from a Python config (config() -> vlm_jax.train.TrainConfig)")
    p.add_argument("config")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.set_defaults(fn=cmd_finetune)
    return parser


# Jobs that run many compiled calls in one process (batches, fits, steps): on CPU each call's large
# buffers are page-faulted in afresh under glibc's default malloc, so these restart themselves with
# vlm_jax.host_memory's tunables (8-27% faster forwards and steps on the CPU preset). convert and
# export are memory-bound (the tunables raise their peak), and one-shot jobs (lens, generate, demo)
# would pay the restart's second start-up for little.
RESTARTED_WITH_MALLOC_TUNABLES = ("extract", "probe", "finetune")


def main(argv=None) -> int:
    """Runs the command line (argv: the arguments after the program name; default sys.argv[1:]).
    Run as a program (argv None), the jobs in RESTARTED_WITH_MALLOC_TUNABLES first restart the
    process with vlm_jax.host_memory's malloc tunables, unless $VLM_JAX_MALLOC_TUNABLES is 0 or
    $GLIBC_TUNABLES already tunes malloc."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in RESTARTED_WITH_MALLOC_TUNABLES:
        from vlm_jax import host_memory

        host_memory.restart_with_tunables()
    from vlm_jax.errors import VlmJaxError

    try:
        return args.fn(args)
    except VlmJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
