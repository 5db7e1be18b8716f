"""What the four study scripts share: arguments, model loading, prompts, results, plots."""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager

import numpy as np

TOY = "checkpoints/toy-llava"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arguments(description: str, study: str, add=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(REPO, TOY),
                        help="hub id, transformers folder or vlm_jax checkpoint (default: the embedded toy)")
    parser.add_argument("--out", default=os.path.join(REPO, "results", study), help="results folder")
    parser.add_argument("--dtype", default=None, help="parameter dtype (e.g. bfloat16 for 7B models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a reduced run (tests): few items, few steps")
    if add is not None:
        add(parser)
    return parser.parse_args()


def load_model(args):
    import vlm_jax as vj

    model = vj.load(args.model, dtype=args.dtype, progress=False)
    if model.processor is None:
        raise SystemExit(f"{args.model} has no processor files; the studies need its tokenizer and image processor")
    return model


def start_study(args, **extra):
    """Loads the model, creates the results folder; (model, rng, results header)."""
    model = load_model(args)
    os.makedirs(args.out, exist_ok=True)
    results = {"model": args.model, "run": "smoke" if args.smoke else "full", **extra}
    return model, np.random.default_rng(args.seed), results


def prompt(model, question: str, n_images: int, prefix: str = "") -> str:
    """The model's own chat template around `question` with n images, answer begun by prefix."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    text = model.processor.chat([{"role": "user", "content": content}])
    return text.rstrip() + (" " + prefix if prefix else "")


@contextmanager
def stage(log: dict, name: str):
    """Times a stage of a study (recorded in the results)."""
    start = time.perf_counter()
    print(f"[{name}]", flush=True)
    yield
    log.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.3f}" if isinstance(x, (float, np.floating)) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def to_json(value):
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_results(out: str, results: dict, tables: dict[str, str], title: str) -> None:
    """results.json and results.md (the tables, in order) in `out`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(to_json(results), f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# {title}\n\nModel: `{results.get('model')}`; run: {results.get('run')}\n\n")
        for name, table in tables.items():
            f.write(f"## {name}\n\n{table}\n\n")
    print(f"results in {out}/ (results.json, results.md, *.png)")


def plot_curves(path: str, curves: dict[str, list[float]], *, xlabel: str, ylabel: str, title: str,
                hlines: dict[str, float] | None = None, xticks: list[str] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{len(curves) + i}", label=label)
    if xticks:
        ax.set_xticks(range(len(xticks)))
        ax.set_xticklabels(xticks, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_bars(path: str, groups: dict[str, dict[str, float]], *, ylabel: str, title: str) -> str:
    """Grouped bars: groups[group][series] -> value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(series):
        ax.bar(np.arange(len(names)) + i * width, [groups[g].get(s, 0.0) for g in names], width, label=s)
    ax.set_xticks(np.arange(len(names)) + width * (len(series) - 1) / 2)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def finetune(model, examples, out_dir: str, *, steps: int, batch_size: int = 16, lr: float = 1e-5,
             trainable="all", lora=None, soft_prompt_tokens: int = 0, seed: int = 0, betas=(0.9, 0.95),
             weight_decay: float = 0.05):
    """A short run of vlm_jax's trainer on `examples` (study protocols: AdamW, 10% warmup,
    cosine, clip 1.0, loss on the answer tokens); returns the trainer (with .state)."""
    from vlm_jax.train import TrainConfig, Trainer

    config = TrainConfig(model=model.source, train_data=examples, output_dir=out_dir,
                         param_dtype=str(model.dtype), learning_rate=lr, betas=betas, weight_decay=weight_decay,
                         warmup_ratio=0.1, batch_size=batch_size, max_steps=steps, save_checkpoints=False,
                         remat=False, progress=False, resume=False, trainable=trainable,
                         lora=lora, soft_prompt_tokens=soft_prompt_tokens, seed=seed, log_every=max(1, steps // 10))
    trainer = Trainer(config, model=model)
    trainer.run()
    return trainer


def trained_model(model, trainer):
    """A Model with the trainer's final parameters (LoRA merged; soft prompt kept separately)."""
    import vlm_jax as vj

    return vj.Model(trainer.merged_params(trainer.state), model.config, processor=model.processor,
                    hf_config=model.hf_config, layout=model.layout, source=model.source)
