"""Interpretability workloads with nnsight and TransformerLens, next to transformers and vlm_jax.

Same model and inputs as interp.py: the LLaVA-1.5-shaped CPU preset (random weights written once
as a transformers folder, loaded by every tool from that folder), batch 1 and 4, one image each,
~600 tokens. Every tool runs the workload the way its users write it:

  capture  every text residual (embeddings + each decoder layer's output) and the logits, one
           forward: transformers output_hidden_states; nnsight one trace saving
           layers[0].input and every layers[i].output; TransformerLens run_with_cache with a
           names_filter for blocks.0.hook_resid_pre and every blocks.i.hook_resid_post
  lens     all-layer logit lens, forward included: final norm + lm_head on each residual at the
           576 image positions, top-5 probabilities (the PyTorch tools keep only the last
           position's logits of the forward itself, vlm_jax computes none)
  sweep8   8 single-layer zero ablations of the image tokens' residual (one per layer), logits
           at the last position: 8 hooked forwards (transformers forward hooks, 8 nnsight traces,
           8 TransformerLens run_with_hooks) vs one vmapped call that shares the layers before
           each ablation (vlm_jax)

Before timing, each tool's outputs are checked against transformers (sdpa attention): capture
logits and residuals and sweep logits to rel_err <= 1e-4, lens top-1 ids equal; a workload that
fails its check is not timed. The transformers and vlm_jax code is interp.py's. TransformerBridge
is booted offline from the folder, with a word-level tokenizer written next to it (the folder has
none, and the bridge insists on one), its processor left unloaded, and its on-the-fly torchvision
install disabled. Tools that are not installed, or that fail to boot, are reported and skipped.

    python benchmarks/interp_tools.py [--batches 1 4] [--repeats 5] [--workdir /tmp/vlm_jax_bench] [--json PATH]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, timed, use_malloc_tunables, workload_parser  # noqa: E402
from interp import (  # noqa: E402
    build_model, hf_lens, hf_sweep, jax_sweep, jax_workloads, lens_top5, make_inputs, prepare, rel_err,
    slow_repeats, sweep_edits)

WORKLOADS = ("capture", "lens", "sweep8")
TOOLS = ("transformers", "nnsight", "TransformerLens", "vlm_jax")
TOLERANCE = 1e-4


@dataclass
class Case:
    """One batch's inputs in every form the tools take (B rows of T tokens, P image tokens)."""

    inputs: dict  # numpy: input_ids [B, T] int64, attention_mask [B, T], pixel_values [B, 3, H, W]
    arrays: dict  # the same as jax arrays
    t_inputs: dict  # the same as torch tensors
    image_mask: np.ndarray  # [B, T] bool
    positions: np.ndarray  # [B, P] int32, the image tokens
    last: np.ndarray  # [B, 1] int32, the last position

    @property
    def batch(self) -> int:
        return self.image_mask.shape[0]

    @property
    def mask_t(self):
        import torch

        return torch.from_numpy(self.image_mask)

    @property
    def idx_t(self):
        import torch

        return torch.from_numpy(self.positions.astype(np.int64))


def make_case(cfg, batch: int) -> Case:
    inputs = make_inputs(cfg, batch)
    return Case(inputs, *prepare(cfg, inputs))


def to_numpy(x) -> np.ndarray:
    """A torch tensor, a jax array, or a list of them (stacked on a new first axis) as numpy."""
    if isinstance(x, (list, tuple)):
        return np.stack([to_numpy(v) for v in x])
    if hasattr(x, "detach"):
        return x.detach().numpy()
    return np.asarray(x)


def stack_tops(tops: list) -> tuple:
    """One torch.topk per layer -> (ids, probs), each [L + 1, B, P, 5]."""
    import torch

    return torch.stack([t.indices for t in tops]), torch.stack([t.values for t in tops])


def load_hf(folder: str):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()


# --- the tools -------------------------------------------------------------------------------
# Each tool has capture(case) -> (logits [B, T, V], residuals), lens(case) -> (ids, probs)
# [L + 1, B, P, 5] and sweep(case) -> logits [8, B, 1, V] (or a list of [B, 1, V]); what they
# return is what is timed, numpy conversion happens only in the checks.


class Transformers:
    """Plain transformers with output_hidden_states and forward hooks (interp.py's baseline)."""

    name = "transformers"

    def __init__(self, folder: str):
        self.hf = load_hf(folder)

    def capture(self, case: Case):
        import torch

        with torch.no_grad():
            out = self.hf(**case.t_inputs, output_hidden_states=True)
        return out.logits, out.hidden_states  # the last hidden state is after the final norm

    def lens(self, case: Case):
        # hf_lens keeps only the last position's logits of the forward (the lens needs none)
        return stack_tops(hf_lens(self.hf, case.t_inputs, case.positions))

    def sweep(self, case: Case):
        return hf_sweep(self.hf, case.t_inputs, case.image_mask)

    def final_norm(self, h: np.ndarray) -> np.ndarray:
        """The text model's final RMSNorm of residuals h [..., D] (to compare a last layer's output)."""
        import torch

        with torch.no_grad():
            return self.hf.model.language_model.norm(torch.tensor(h)).numpy()  # a copy: h may be read-only


class Nnsight:
    """nnsight's generic NNsight wrapper around the transformers model."""

    name = "nnsight"

    def __init__(self, folder: str):
        from nnsight import NNsight

        # its own copy, so the transformers baseline runs on a module nnsight never wrapped
        self.model = NNsight(load_hf(folder))
        self.lm = self.model.model.language_model

    def residuals_in_trace(self) -> list:
        """Inside a trace: the embeddings (layer 0's input) and every layer's output, [B, T, D]."""
        return [self.lm.layers[0].input] + [layer.output for layer in self.lm.layers]

    def capture(self, case: Case):
        import nnsight
        import torch

        with torch.no_grad():
            with self.model.trace(**case.t_inputs):
                states = nnsight.save(self.residuals_in_trace())
                logits = nnsight.save(self.model.output.logits)
        return logits, states

    def lens(self, case: Case):
        import nnsight
        import torch

        with torch.no_grad():
            # as nnsight's logit-lens tutorial does it: the model's own norm and head, applied in the trace
            with self.model.trace(**case.t_inputs, logits_to_keep=1):
                tops = nnsight.save([lens_top5(self.lm.norm, self.model.lm_head, h, case.idx_t)
                                     for h in self.residuals_in_trace()])
        return stack_tops(tops)

    def sweep(self, case: Case):
        import nnsight
        import torch

        # a generic NNsight cannot batch several invokes into one forward: one trace per ablation
        mask, outs = case.mask_t, []
        with torch.no_grad():
            for layer in self.lm.layers:
                with self.model.trace(**case.t_inputs, logits_to_keep=1):
                    layer.output[mask] = 0.0
                    logits = nnsight.save(self.model.output.logits)
                outs.append(logits)
        return outs


def word_tokenizer(workdir: str):
    """vlm_jax's word-level tokenizer, saved once and reloaded from disk.

    TransformerBridge needs a tokenizer and the model folder has none. It reloads any tokenizer
    whose add_bos_token is unset from the tokenizer's own name_or_path, so the tokenizer must come
    from a folder and carry add_bos_token=True. The inputs are token ids: its vocabulary is unused.
    """
    from transformers import AutoTokenizer

    from vlm_jax.random_model import build_tokenizer

    folder = os.path.join(workdir, "word-tokenizer")
    if not os.path.exists(folder):
        build_tokenizer().save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def boot_bridge(folder: str, workdir: str):
    """A TransformerBridge over the folder's LlavaForConditionalGeneration, offline, on the CPU."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    # With no processor in the folder, the boot would pip-install torchvision and retry (that
    # would replace this machine's torch); we never use a processor, so refuse the install.
    if not hasattr(helpers, "_ensure_torchvision"):
        raise RuntimeError("cannot disable its torchvision auto-install (helpers._ensure_torchvision is gone)")
    helpers._ensure_torchvision = lambda: False
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(folder, device="cpu", tokenizer=word_tokenizer(workdir))


class TransformerLens:
    """TransformerLens 4's TransformerBridge: run_with_cache and run_with_hooks."""

    name = "TransformerLens"

    def __init__(self, folder: str, workdir: str):
        self.bridge = boot_bridge(folder, workdir)
        n_layers = self.bridge.cfg.n_layers
        self.names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]

    @staticmethod
    def args(case: Case) -> tuple:
        """(input_ids [B, T], the other model inputs as keywords)."""
        t = case.t_inputs
        return t["input_ids"], {"pixel_values": t["pixel_values"], "attention_mask": t["attention_mask"]}

    def capture(self, case: Case):
        import torch

        ids, kwargs = self.args(case)
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(ids, names_filter=self.names, **kwargs)
        return logits, [cache[name] for name in self.names]

    def lens(self, case: Case):
        import torch

        ids, kwargs = self.args(case)
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(ids, names_filter=self.names, logits_to_keep=1, **kwargs)
            tops = [lens_top5(self.bridge.ln_final, self.bridge.unembed, cache[name], case.idx_t)
                    for name in self.names]
        return stack_tops(tops)

    def sweep(self, case: Case):
        import torch

        ids, kwargs = self.args(case)
        mask = case.mask_t

        def zero_image_tokens(resid, hook):
            resid[mask] = 0.0
            return resid

        with torch.no_grad():
            return [self.bridge.run_with_hooks(ids, fwd_hooks=[(name, zero_image_tokens)], logits_to_keep=1, **kwargs)
                    for name in self.names[1:]]


class VlmJax:
    """vlm_jax, with interp.py's jitted workloads."""

    name = "vlm_jax"

    def __init__(self, folder: str):
        import vlm_jax as vj

        self.model = vj.load(folder, progress=False)
        self.fns = jax_workloads(self.model.config)
        self.sets = {}  # batch -> the 8 Edits, built once like interp.py does

    def capture(self, case: Case):
        import jax

        return jax.block_until_ready(self.fns["capture"](self.model.params, case.arrays))

    def lens(self, case: Case):
        import jax

        return jax.block_until_ready(self.fns["lens"](self.model.params, case.arrays, case.positions))

    def sweep(self, case: Case):
        import jax

        if case.batch not in self.sets:
            self.sets[case.batch] = sweep_edits(self.model, case.image_mask)
        return jax.block_until_ready(jax_sweep(self.model, case.inputs, self.sets[case.batch], case.last))

    @staticmethod
    def residuals(acts: dict):
        """The captured text.embed and text.resid_post as one array [L + 1, B, T, D]."""
        from vlm_jax.interp.logit_lens import stack_residuals

        return stack_residuals(acts)


# --- checks ----------------------------------------------------------------------------------


@dataclass
class Reference:
    """transformers' outputs for one case (see the tools' return values for shapes)."""

    logits: np.ndarray
    hidden: np.ndarray  # [L + 1, B, T, D], the last one after the final norm
    lens_ids: np.ndarray
    sweep: np.ndarray
    final_norm: Callable = field(repr=False)  # Transformers.final_norm


def reference(tool: Transformers, case: Case) -> Reference:
    logits, hidden = tool.capture(case)
    return Reference(to_numpy(logits), to_numpy(hidden), to_numpy(tool.lens(case)[0]), to_numpy(tool.sweep(case)),
                     tool.final_norm)


def check(tool, workload: str, case: Case, ref: Reference) -> tuple[bool, dict]:
    """Runs one workload once and compares it with transformers: (passed, measured errors)."""
    if workload == "capture":
        logits, states = tool.capture(case)
        states = to_numpy(tool.residuals(states) if hasattr(tool, "residuals") else states)
        n = len(states) - 1  # transformers' last hidden state is final-normed: normalise ours to compare
        errs = [rel_err(states[i], ref.hidden[i]) for i in range(n)]
        errs.append(rel_err(ref.final_norm(states[n]), ref.hidden[n]))
        found = {"logits_rel_err": rel_err(to_numpy(logits), ref.logits), "residuals_rel_err": max(errs)}
        return max(found.values()) <= TOLERANCE, found
    if workload == "lens":
        ids = to_numpy(tool.lens(case)[0])
        found = {"top1_equal": float(np.mean(ids[..., 0] == ref.lens_ids[..., 0])),
                 "top5_equal": float(np.mean(ids == ref.lens_ids))}
        return found["top1_equal"] == 1.0, found
    found = {"sweep_rel_err": rel_err(to_numpy(tool.sweep(case)), ref.sweep)}
    return found["sweep_rel_err"] <= TOLERANCE, found


def run_checks(tools: dict, case: Case, ref: Reference) -> dict:
    """{tool: {workload: (passed, found or error text)}} for every tool but transformers."""
    out = {}
    for name, tool in tools.items():
        if name == "transformers" or isinstance(tool, str):
            continue
        out[name] = {}
        for workload in WORKLOADS:
            try:
                out[name][workload] = check(tool, workload, case, ref)
            except Exception as e:  # a tool that cannot run a workload is reported, not fatal
                out[name][workload] = (False, f"error: {reason(e)}")
    return out


def check_cell(result: tuple, keys: tuple) -> str:
    passed, found = result
    if isinstance(found, str):
        return found
    text = ", ".join(f"{found[k]:.1e}" if "err" in k else f"{found[k]:.4f}" for k in keys)
    return text + ("" if passed else " FAIL")


def print_checks(batch: int, checks: dict) -> None:
    print(f"\nchecks, batch {batch}, against transformers (rel_err = max|a - b| / max|b|, limit {TOLERANCE:g}):")
    print("| tool | capture: logits, residuals rel_err | lens: top-1, top-5 ids equal | sweep8: logits rel_err |")
    print("|---|---|---|---|")
    for name, result in checks.items():
        print(f"| {name} | {check_cell(result['capture'], ('logits_rel_err', 'residuals_rel_err'))} "
              f"| {check_cell(result['lens'], ('top1_equal', 'top5_equal'))} "
              f"| {check_cell(result['sweep8'], ('sweep_rel_err',))} |")


# --- timing and report -----------------------------------------------------------------------


def reason(e: Exception) -> str:
    """An exception as one line of at most 300 characters, for the report."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def load_tools(folder: str, workdir: str) -> dict:
    """{name: tool, or the reason it is not timed}."""
    tools = {"transformers": Transformers(folder)}
    builders = {"nnsight": lambda: Nnsight(folder), "TransformerLens": lambda: TransformerLens(folder, workdir)}
    modules = {"nnsight": "nnsight", "TransformerLens": "transformer_lens"}
    for name, build in builders.items():
        if importlib.util.find_spec(modules[name]) is None:
            tools[name] = "not installed"
            continue
        try:
            tools[name] = build()
        except Exception as e:  # e.g. no hub access, a missing processor: say why, go on
            tools[name] = f"not timed: {reason(e)}"
    tools["vlm_jax"] = VlmJax(folder)
    return tools


def time_case(tools: dict, case: Case, checks: dict, repeats: int) -> list:
    """Median seconds of every workload for every tool whose check passed (None otherwise)."""
    rows = []
    for workload in WORKLOADS:
        row = {"workload": workload, "batch": case.batch}
        for name, tool in tools.items():
            if isinstance(tool, str) or (name in checks and not checks[name][workload][0]):
                row[name] = None
                continue
            run = getattr(tool, "sweep" if workload == "sweep8" else workload)
            # the PyTorch sweeps are 8 forwards per call: interp.py's fewer repeats
            n = slow_repeats(repeats) if workload == "sweep8" and name != "vlm_jax" else repeats
            row[name] = timed(lambda: run(case), n)["median"]
        rows.append(row)
    return rows


def cell(seconds, status: str) -> str:
    return f"{seconds:.3f}" if seconds is not None else status


def print_table(rows: list, status: dict) -> None:
    others = TOOLS[:-1]
    print("\n| workload | batch | transformers hooks (s, median) | nnsight (s) | TransformerLens (s) | vlm_jax (s) | "
          + " | ".join(f"vlm_jax speed-up vs {t}" for t in others) + " |")
    print("|---|---|" + "---|" * (len(TOOLS) + len(others)))
    for r in rows:
        times = [cell(r[t], status[t]) for t in TOOLS]
        ours = r["vlm_jax"]
        speedups = [f"{r[t] / ours:.1f}x" if r[t] is not None and ours else "n/a" for t in others]
        print(f"| {r['workload']} | {r['batch']} | " + " | ".join(times + speedups) + " |")


def tool_versions() -> str:
    parts = []
    for name, package in (("transformers", "transformers"), ("nnsight", "nnsight"),
                          ("TransformerLens", "transformer-lens"), ("vlm_jax", "vlm_jax")):
        try:
            parts.append(f"{name} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{name} (no version)")
    return "; ".join(parts)


def main() -> int:
    use_malloc_tunables()
    parser = workload_parser(__doc__, repeats=5)
    args = parser.parse_args()
    # everything is loaded from local folders: fail at once rather than wait on a network call
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    folder = build_model(args.workdir)
    tools = load_tools(folder, args.workdir)
    status = {name: (tool if isinstance(tool, str) else "check failed") for name, tool in tools.items()}
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"tools: {tool_versions()}")
    for name, tool in tools.items():
        if isinstance(tool, str):
            print(f"{name}: {tool}")
    cfg = tools["vlm_jax"].model.config
    rows, all_checks, failed = [], {}, False
    for batch in args.batches:
        case = make_case(cfg, batch)
        checks = run_checks(tools, case, reference(tools["transformers"], case))
        print_checks(batch, checks)
        failed |= not all(passed for result in checks.values() for passed, _ in result.values())
        all_checks[batch] = {n: {w: {"passed": p, "found": f} for w, (p, f) in r.items()} for n, r in checks.items()}
        rows += time_case(tools, case, checks, args.repeats)
    print_table(rows, status)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "tools": {n: status[n] if isinstance(t, str) else "ok"
                                                      for n, t in tools.items()},
                       "checks": all_checks, "results": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
