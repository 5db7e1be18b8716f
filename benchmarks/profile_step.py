"""Where a compiled step's time goes, by model component and phase, from a JAX profiler trace.

Runs one workload on the LLaVA-shaped CPU preset (the model of finetune.py and interp.py), traces
--steps executions of its compiled program with jax.profiler, and charges every op's time to the
named scope its HLO metadata carries (the model code names them: vision_tower, projector, embed,
text_decoder, unembed, loss, optimizer; within layers attention, qkv_proj, out_proj, mlp, norm,
rope) and to its phase: forward, backward (autodiff's transpose) or recompute
(rematerialisation). Workloads:
  full     one AdamW step of every parameter (finetune.py's, with --remat)
  lora     one step of rank-8 LoRA on the text decoder's q_proj / v_proj
  forward  a forward pass of --batch examples (interp.py's)
  prefill  generate's prefill of --batch rows (the interp.py prompt padded to generate's width,
           the cache filled, the last layer at the last position only) and the first token's logits
  decode   one decode step of --batch rows as generate's loop runs it (its weights' form for
           that many rows, its CPU compiler options), at slot 630 of a 672-slot cache: the
           generation.py prompt (601 tokens in a 608-token bucket) plus 64 new-token slots

How time is counted. Ops that run at the same time (XLA CPU runs independent ops on its threads
side by side) share the time they overlap. On CPU some products (XLA's Eigen dots) run
asynchronously: their trace event covers only their launch, and the time until the next op
starts shows as a span where no op runs. Such a span is shared by the asynchronous products
launched since the previous one (marked "async" in the top ops; "(runtime)" when none was). On an
accelerator only the device's events are read (the host's launches would count twice); that path
is untested so far (no accelerator was lent since this script was written). A few ops come out of
XLA CPU's passes without their scope (a decode step's attention products): they count as "other".

    python benchmarks/profile_step.py [--workload full] [--remat dots] [--batch 2] [--steps 2] [--top 12]
    python benchmarks/profile_step.py --workload decode --batch 4 --steps 20
    python benchmarks/profile_step.py --model llava-1.5-7b --dtype bfloat16 --workload lora --remat none --pad-to 64
                                                    # on a GPU (VLM_JAX_FUSED_GRADIENT=cudnn to compare)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, use_malloc_tunables  # noqa: E402
from finetune import batch_arrays, compiled_step, pad_right  # noqa: E402
from interp import build_model, make_inputs  # noqa: E402

COMPONENTS = ("vision_tower", "projector", "embed", "text_decoder", "unembed", "loss", "optimizer")
PARTS = ("attention", "qkv_proj", "out_proj", "mlp", "norm", "rope")
# an HLO instruction: name, result shape, opcode, and its op_name metadata when it has one
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", re.M)
# ops whose trace events span other ops' events (their bodies), so they are not charged themselves
CONTAINERS = ("while", "conditional", "call")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict:
    """{instruction name: (shape, opcode, op_name)} of an optimised HLO module's text."""
    table = {}
    for name, shape, opcode, rest in INSTRUCTION.findall(hlo_text):
        found = OP_NAME.search(rest)
        table[name] = (re.sub(r"\{[^}]*\}", "", shape), opcode, found.group(1) if found else "")
    return table


def scope_of(op_name: str) -> tuple[str, str, str]:
    """(component, part, phase) of an op from its op_name metadata, e.g.
    'jit(_train_step)/.../transpose(jvp(text_decoder))/while/body/.../attention/dot_general'
    -> ('text_decoder', 'attention', 'backward')."""
    words = re.split(r"[/()]", op_name)
    component = next((w for w in words if w in COMPONENTS), "other")
    part = next((w for w in reversed(words) if w in PARTS), "rest")
    if component == "optimizer":
        phase = "update"
    elif "rematted_computation" in words:
        phase = "recompute"
    elif "transpose(jvp" in op_name:  # autodiff's transposition (a plain transpose op is "/transpose")
        phase = "backward"
    else:
        phase = "forward"
    return component, part, phase


def read_trace(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the trace jax.profiler wrote under trace_dir that name an HLO
    op, from the device's processes when there is a device besides the host."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    events = json.load(gzip.open(max(files, key=os.path.getmtime)))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if name.startswith("/device:")}
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and (not devices or e["pid"] in devices)]


def attribute(events: list[dict], instructions: dict, module: str) -> tuple[collections.Counter, int]:
    """Microseconds charged to each op of `module` (shared where ops overlap; a span with no op
    running goes to the asynchronous products launched before it, or to '(runtime)'), and the
    number of executions the events' run ids tell apart (events without one count as one)."""
    runs = collections.defaultdict(list)
    for e in events:
        opcode = instructions.get(e["args"]["hlo_op"], ("", "", ""))[1]
        if e["args"].get("hlo_module") == module and opcode not in CONTAINERS:
            runs[e["args"].get("run_id")].append(e)
    charged = collections.Counter()
    for run in runs.values():
        points = sorted([(e["ts"], 1, i) for i, e in enumerate(run)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(run)])
        # an idle span is split among the asynchronous products launched since the previous idle
        # span, or charged like that span when none was (they are still running)
        active, last_time, launched, waited_for = set(), None, [], ["(runtime)"]
        for t, kind, i in points:
            if last_time is not None and t > last_time:
                if active:
                    for j in active:
                        charged[run[j]["args"]["hlo_op"]] += (t - last_time) / len(active)
                else:
                    waited_for, launched = (launched or waited_for), []
                    for op in waited_for:
                        charged[op] += (t - last_time) / len(waited_for)
            last_time = t
            if kind == 1:
                active.add(i)
                if instructions.get(run[i]["args"]["hlo_op"], ("", "", ""))[1] == "dot":
                    launched.append(run[i]["args"]["hlo_op"])
            else:
                active.discard(i)
    return charged, len(runs)


MODELS = ("cpu-preset", "llava-1.5-7b")


def model_folder(workdir: str, tiny: bool, model: str = "cpu-preset", dtype: str = "float32") -> str:
    """The model's folder: the CPU preset (interp.py's), or llava-1.5-7b's shape with random
    weights in `dtype` (gpu.py's, for accelerators), or with tiny=True a 2 + 2 layer model with
    the same vocabulary and image token (make_inputs works unchanged): a smoke run of this script.
    The random folders are named by their dtype, so a folder reused later holds what its name says."""
    from vlm_jax.config import PRESETS
    from vlm_jax.random_model import make_random_llava, tiny_hf_config

    if not tiny and model == "cpu-preset":
        return build_model(workdir)
    config = tiny_hf_config(32064, 32000) if tiny else PRESETS[model]
    folder = os.path.join(workdir, f"{'profile-tiny' if tiny else model}-{dtype}")
    if not os.path.exists(folder):
        make_random_llava(folder, config, dtype=dtype, with_processor=False)
    return folder


def decode_step(model, batch: int, slots: int = 672, slot: int = 630):
    """(the compiled decode step, a function that runs it once and waits): one new token per row
    at `slot` of per-layer caches of `slots` slots holding random keys and values, on the
    weights in the form generate picks for `batch` rows (generate.decode_params)."""
    import jax
    import jax.numpy as jnp

    from vlm_jax import generate as gen
    from vlm_jax.models import text_decoder

    config = model.config
    kernels = gen.decode_kernel_form(model.params, batch)
    params = jax.jit(gen.decode_params, static_argnums=1)(model.params, kernels)
    keys = iter(jax.random.split(jax.random.key(0), 2 * config.text.num_layers))
    cache = tuple({name: jax.random.normal(next(keys), buffer.shape, buffer.dtype) for name, buffer in layer.items()}
                  for layer in text_decoder.init_cache(config.text, batch, slots, jnp.float32, per_layer=True))
    key_valid = jnp.arange(slots)[None, :].repeat(batch, 0) <= slot
    state = {"cache": cache, "token": jnp.zeros((batch,), jnp.int32)}
    position = jnp.full((batch,), slot, jnp.int32)

    def step(params, cache, token):  # greedy
        logits, cache = gen.decode_forward(params, config, token, position, cache, jnp.int32(slot), key_valid)
        return gen.greedy_token(logits), cache

    program = jax.jit(step, donate_argnums=1, compiler_options=gen.compiler_options(model.params)).lower(
        params, state["cache"], state["token"]).compile()

    def run_once():
        state["token"], state["cache"] = program(params, state["cache"], state["token"])
        jax.block_until_ready(state["token"])

    print(f"decode step: {batch} rows, weights {kernels or 'as per-layer copies (XLA products)'}")
    return program, run_once


def prefill_step(model, batch: int):
    """(the compiled prefill, a function that runs it once and waits): generate's prefill of the
    interp.py prompt for `batch` rows, left-aligned and padded to generate.prompt_width."""
    import jax
    import jax.numpy as jnp

    from vlm_jax import generate as gen

    raw = make_inputs(model.config, batch)
    ids, mask = (jnp.asarray(a) for a in gen.pad_prompts(raw["input_ids"], raw["attention_mask"], 0))
    pixels = jnp.asarray(raw["pixel_values"])
    program = jax.jit(gen.prefill, static_argnums=1, compiler_options=gen.compiler_options(model.params)).lower(
        model.params, model.config, ids, mask, pixels).compile()

    def run_once():
        jax.block_until_ready(program(model.params, ids, mask, pixels))

    return program, run_once


def build_workload(name: str, remat: str, batch: int, folder: str, dtype: str = "float32", pad_to: int = 1):
    """(the compiled program, a function that runs it once and waits). pad_to: the training
    batches' rows are right-padded to a multiple of it (finetune.pad_right)."""
    import jax

    import vlm_jax as vj
    from vlm_jax.models import llava

    model = vj.load(folder, dtype=dtype, progress=False)
    if name == "decode":
        return decode_step(model, batch)
    if name == "prefill":
        return prefill_step(model, batch)
    if name == "forward":
        inputs = {k: jax.numpy.asarray(v) for k, v in make_inputs(model.config, batch).items()}
        program = llava.forward_jit.lower(model.params, model.config, inputs).compile()

        def run_once():
            jax.block_until_ready(program(model.params, inputs).logits)

        return program, run_once
    unpadded = batch_arrays(model.config, batch, seed=0)
    rows = pad_right(unpadded, pad_to)
    print(f"training batch: {batch} rows x {rows['input_ids'].shape[1]} tokens ({unpadded['input_ids'].shape[1]} real)")
    data = {k: v[None] for k, v in rows.items()}  # [accum=1, batch, ...]
    if jax.numpy.dtype(dtype) != jax.numpy.float32:  # the pixels in the parameters' dtype, as the trainer feeds them
        data["pixel_values"] = data["pixel_values"].astype(jax.numpy.dtype(dtype))
    _, program, run_once = compiled_step(model, folder, name, remat, data,
                                         os.path.join(os.path.dirname(folder), "profile-train"), param_dtype=dtype)
    return program, run_once


def main() -> None:
    use_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("full", "lora", "forward", "prefill", "decode"), default="full")
    parser.add_argument("--remat", default="dots", help="TrainConfig.remat of the training workloads")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2,
                        help="executions traced (after 5 untraced ones and a discarded traced pass)")
    parser.add_argument("--top", type=int, default=12, help="how many of the costliest ops to list")
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run of this script")
    parser.add_argument("--model", choices=MODELS, default="cpu-preset",
                        help="llava-1.5-7b: the 7B's shape with random weights (for an accelerator, with "
                             "--dtype bfloat16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the parameters' dtype (and the training workloads' param_dtype)")
    parser.add_argument("--pad-to", type=int, default=1,
                        help="right-pad the training batches to a multiple of this many tokens (cuDNN's attention "
                             "backward, VLM_JAX_FUSED_GRADIENT=cudnn, needs even lengths)")
    args = parser.parse_args()

    import jax

    folder = model_folder(args.workdir, args.tiny, args.model, args.dtype)
    program, run_once = build_workload(args.workload, args.remat, args.batch, folder, args.dtype, args.pad_to)
    instructions = hlo_instructions(program.as_text())
    module = program.runtime_executable().hlo_modules()[0].name
    # Two warm-up executions first: a step that donates its state writes its outputs into two sets
    # of buffers in turn, and each set page-faults in on its first use (even with the malloc
    # tunables). Then three timed ones, untraced.
    untraced = []
    for i in range(5):
        start = time.perf_counter()
        run_once()
        if i >= 2:
            untraced.append(time.perf_counter() - start)
    # A traced pass that is thrown away: the profiler's own buffers, malloc'ed between the step's,
    # would otherwise make the first traced steps page-fault (zero-filling broadcasts then showed at
    # ~1 GB/s, 20% of a full step).
    for discard in (True, False):
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(args.steps):
                    run_once()
            if not discard:
                charged, runs = attribute(read_trace(trace_dir), instructions, module)
    if not charged:
        raise RuntimeError(f"the trace holds no op of {module}: nothing to attribute")
    if runs not in (1, args.steps):  # (a backend whose events carry no run id gives one group)
        raise RuntimeError(f"the trace holds {runs} executions of {module}, not the {args.steps} run")
    runs = args.steps
    per_step = {op: us / runs / 1e3 for op, us in charged.items()}  # ms
    total = sum(per_step.values())

    print(f"machine: {machine()}")
    remat = f", remat={args.remat}" if args.workload in ("full", "lora") else ""
    model = f"{'a tiny model' if args.tiny else args.model} in {args.dtype}"
    print(f"workload: {args.workload} on {model} (batch {args.batch}{remat}); untraced step {statistics.median(untraced):.3f} s, "
          f"traced {total / 1e3:.3f} s (mean of {runs})")
    table = collections.defaultdict(collections.Counter)
    for op, ms in per_step.items():
        component, part, phase = scope_of(instructions.get(op, ("", "", ""))[2]) if op != "(runtime)" else ("other", "(runtime)", "forward")
        table[(component, part)][phase] += ms
    phases = ("forward", "backward", "recompute", "update")
    print("\n| component | part | " + " | ".join(f"{p} (ms)" for p in phases) + " | total (ms) | share |")
    print("|---|---|" + "---|" * (len(phases) + 2))
    order = {c: i for i, c in enumerate((*COMPONENTS, "other"))}
    for (component, part), row in sorted(table.items(), key=lambda kv: (order[kv[0][0]], -sum(kv[1].values()))):
        cells = " | ".join(f"{row[p]:.1f}" if row[p] else "" for p in phases)
        print(f"| {component} | {part} | {cells} | {sum(row.values()):.1f} | {100 * sum(row.values()) / total:.1f}% |")
    print(f"\n{args.top} costliest ops (ms per step; 'async': an asynchronous product, charged the time until "
          "the next op started):")
    for op, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, opcode, op_name = instructions.get(op, ("", "", ""))
        where = "/".join(x for x in scope_of(op_name) if x not in ("rest", "other")) if op_name else ""
        kind = " async" if opcode == "dot" else ""
        print(f"  {ms:8.1f}  {op}{kind}  {shape}  {where}")


if __name__ == "__main__":
    main()
