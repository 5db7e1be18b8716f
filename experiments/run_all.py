"""Runs the four studies (on the embedded toy by default) and says where the results are.

    python experiments/run_all.py [--model M] [--smoke] [--only needs_words finer ...]

Each study writes results/<study>/results.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from vlm_jax import host_memory

STUDIES = ("needs_words", "hidden_in_plain_sight", "compensate", "finer")
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="any supported checkpoint (default: checkpoints/toy-llava)")
    parser.add_argument("--smoke", action="store_true", help="reduced runs")
    parser.add_argument("--only", nargs="+", choices=STUDIES, help="run only these studies")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results"))
    args = parser.parse_args()
    summary = []
    for study in args.only or STUDIES:
        cmd = [sys.executable, os.path.join(HERE, study, "run.py"), "--out", os.path.join(args.out, study)]
        if args.model:
            cmd += ["--model", args.model]
        if args.smoke:
            cmd.append("--smoke")
        print(f"=== {study}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, env=host_memory.environment())  # malloc reusing XLA's buffers: faster
        minutes = (time.perf_counter() - start) / 60
        summary.append((study, code, minutes))
        if code:
            print(f"{study} failed (exit {code})", file=sys.stderr)
    print("\nstudy                  status   minutes  results")
    for study, code, minutes in summary:
        where = os.path.join(args.out, study, "results.md")
        print(f"{study:22s} {'ok' if code == 0 else 'FAILED':8s} {minutes:7.1f}  {where}")
    return max((code for _, code, _ in summary), default=0)


if __name__ == "__main__":
    sys.exit(main())
