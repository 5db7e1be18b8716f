"""`vlm-jax` command line: demo, convert, export, generate, lens."""

from __future__ import annotations

import argparse
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

    model = vj.load(args.model, dtype=_dtype(args.dtype))
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

    model = vj.load(args.model, dtype=_dtype(args.dtype))
    images = [_open_image(p) for p in args.image]
    batch = _prepare(model, images, args.prompt, args.chat)
    lens = patch_lens(model, batch, image=args.image_index, k=args.k)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_patch_lens(lens, args.out, layers, title=f"logit lens: {os.path.basename(args.image[args.image_index])}")
    print(lens_table(lens, layers))
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from vlm_jax.demo import run_demo

    run_demo(args.workdir, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("generate", help="generate text for an image and a prompt")
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

    p = sub.add_parser("lens", help="logit lens of every patch of an image: PNG + text table")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vlm_jax.errors import VlmJaxError

    try:
        return args.fn(args)
    except VlmJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
