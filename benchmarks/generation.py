"""Greedy decoding, vlm_jax vs transformers' generate() (PyTorch), same run, same machine.

Model: the LLaVA-1.5-shaped CPU preset (~62M parameters, 576 image tokens), random weights
written once as a transformers folder so both libraries load the same tensors. Inputs: batch
1 and 4, one image each, ~600 prompt tokens; N new tokens with no EOS stop (both libraries
produce exactly N tokens), for each N given (default 32 and 128: at 32 the prefill is over half
of the time). Before timing, both must produce the same tokens (at the longest N).

Reported: median seconds for prefill + N tokens, new tokens/s, the ratio, and each library's
time against two floors:
- FLOPs alone: the prefill and N - 1 cached steps at the best measured matmul rate;
- a roofline: the prefill at that rate, and each decode step at the slower of its FLOPs and
  the bytes it must read (every text weight, the unembedding, the filled cache) at the best
  measured read rate. Decoding at small batch is bound by the bytes.
And the decode steps alone, from the same runs with 1 new token (prefill + first token)
subtracted: (t_N - t_1) / (N - 1) per step, i.e. tokens/s of the cached decode loop without
the prefill, against the roofline's steps.

    python benchmarks/generation.py [--batches 1 4] [--new-tokens 32 128] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    best_of, generation_floor, generation_flops, machine, matmul_peak, peak_line, stream_peak, timed, use_malloc_tunables,
    workload_parser)
from interp import build_model, make_inputs  # noqa: E402


def main() -> None:
    use_malloc_tunables()
    parser = workload_parser(__doc__, repeats=3)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128],
                        help="generation lengths to time (each against the same 1-token runs)")
    args = parser.parse_args()

    import torch
    from transformers import LlavaForConditionalGeneration

    import vlm_jax as vj

    torch.set_num_threads(os.cpu_count())
    folder = build_model(args.workdir)
    model = vj.load(folder, progress=False)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lengths = args.new_tokens
    if min(lengths) < 2:
        parser.error("--new-tokens: every length must be >= 2 (the decode step is timed against 1-token runs)")
    print(f"machine: {machine()}\nmodel: {model}\nnew tokens: {lengths} (greedy, no EOS stop)\n")
    # the machine's rates, probed again after the timings; the floors use the better of each
    probes, read_rates = [matmul_peak()], [stream_peak()]
    rows = []
    for batch in args.batches:
        arrays = make_inputs(model.config, batch)
        prompt = arrays["input_ids"].shape[1]
        ours = lambda k: model.generate(arrays, k, eos_token_ids=()).tokens  # noqa: E731
        t_in = {k: torch.from_numpy(v) for k, v in arrays.items()}

        def theirs(k):
            with torch.no_grad():
                out = hf.generate(**t_in, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
            return out[:, prompt:].numpy()

        longest = max(lengths)
        if not np.array_equal(np.asarray(ours(longest)), theirs(longest)):
            raise SystemExit(f"batch {batch}: vlm_jax and transformers generated different tokens")
        t1_ours = timed(lambda: np.asarray(ours(1)), args.repeats)["median"]
        t1_hf = timed(lambda: theirs(1), args.repeats)["median"]
        for n in lengths:
            t_ours = timed(lambda: np.asarray(ours(n)), args.repeats)["median"]
            t_hf = timed(lambda: theirs(n), args.repeats)["median"]
            step_ours, step_hf = (t_ours - t1_ours) / (n - 1), (t_hf - t1_hf) / (n - 1)
            row = {"batch": batch, "new_tokens": n, "vlm_jax_s": t_ours, "transformers_s": t_hf,
                   "vlm_jax_tok_s": batch * n / t_ours, "transformers_tok_s": batch * n / t_hf,
                   "speedup": t_hf / t_ours, "vlm_jax_first_token_s": t1_ours, "transformers_first_token_s": t1_hf,
                   "vlm_jax_decode_step_s": step_ours, "transformers_decode_step_s": step_hf,
                   "decode_speedup": step_hf / step_ours, "prompt": prompt}
            rows.append(row)
            print(f"batch {batch}, {n} new tokens: vlm_jax {t_ours:.3f}s ({row['vlm_jax_tok_s']:.1f} tok/s)  "
                  f"transformers {t_hf:.3f}s ({row['transformers_tok_s']:.1f} tok/s)  -> {row['speedup']:.2f}x  "
                  "[tokens equal]")
            print(f"  prefill + first token: vlm_jax {t1_ours:.3f}s, transformers {t1_hf:.3f}s; decode step: "
                  f"vlm_jax {1e3 * step_ours:.1f} ms ({batch / step_ours:.0f} tok/s), transformers "
                  f"{1e3 * step_hf:.1f} ms ({batch / step_hf:.0f} tok/s) -> {step_hf / step_ours:.2f}x")
    probes.append(matmul_peak())
    read_rates.append(stream_peak())
    peak, bandwidth = best_of(*probes), max(read_rates)
    print(f"\n{peak_line(peak, probes)}; best read rate: {bandwidth / 1e9:.1f} GB/s (a jitted sum over 512 MiB, "
          f"before / after: {' / '.join(f'{r / 1e9:.1f}' for r in read_rates)}).\nFLOP floor = prefill and decode "
          "steps at the matmul rate; roofline floor = the prefill at the matmul rate, each decode step at the "
          "slower of its FLOPs and its bytes (every text weight, the unembedding and the filled cache, at the "
          "read rate)")
    for row in rows:
        batch, n, prompt = row["batch"], row["new_tokens"], row["prompt"]
        roof, roof_1 = (generation_floor(model.config, batch, prompt, k, peak["best"], bandwidth) for k in (n, 1))
        row.update(floor_s=generation_flops(model.config, batch, prompt, n) / peak["best"], roofline_floor_s=roof,
                   decode_step_floor_s=(roof - roof_1) / (n - 1))
        t_ours, t_hf, step_floor = row["vlm_jax_s"], row["transformers_s"], row["decode_step_floor_s"]
        print(f"batch {batch}, {n} new tokens: FLOP floor {row['floor_s']:.3f}s: vlm_jax "
              f"{t_ours / row['floor_s']:.2f}x it, transformers {t_hf / row['floor_s']:.2f}x; roofline floor "
              f"{roof:.3f}s: vlm_jax {t_ours / roof:.2f}x, transformers {t_hf / roof:.2f}x; decode step floor "
              f"{1e3 * step_floor:.1f} ms: vlm_jax {row['vlm_jax_decode_step_s'] / step_floor:.2f}x, "
              f"transformers {row['transformers_decode_step_s'] / step_floor:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "peak_flops": peak, "probes": probes, "read_rates": read_rates,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
