"""glibc malloc tunables that let XLA CPU reuse its buffers' memory from call to call.

XLA CPU mallocs each call's outputs and its temporary buffer. glibc serves blocks of more than
32 MB with fresh mmaps and unmaps them when freed, so every call page-faults them in again, 4 KB
at a time, each page zeroed by the kernel: a batch-1 forward's logits [1, 601, 32064] (77 MB) are
19.4k faults, and a full finetuning step without rematerialisation 265k (1 GB). With

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

every block comes from one heap that is never trimmed, so a freed buffer's pages serve the next
call's: no page faults once warm. On the CPU preset forwards ran 10-15% faster (40% when they
alternate with other programs) and training steps 8-27% (benchmarks/RESULTS.md, "glibc malloc
tunables").
glibc's huge-page tunable (glibc.malloc.hugetlb=1) was as fast for one workload repeated, but up to
1.6x slower than plain malloc when two alternate, so it is not used.

The cost: memory the process has freed stays with it (for reuse), so its peak resident memory can
be higher: loading a checkpoint peaked at 1.36x / 1.65x its size (safetensors / orbax) against
1.20x / 1.34x. Memory-bound jobs (converting a 13B checkpoint) are better off without.

glibc reads its tunables when a process starts, so they cannot be switched on from inside Python.
This module sets them for the processes it starts (`environment`), or restarts the current one with
them (`restart_with_tunables`): experiments/run_all.py starts the studies with them, and the
benchmark scripts and the `vlm-jax` jobs extract, probe and finetune restart themselves with them.
In your own scripts and notebooks set GLIBC_TUNABLES as above. `VLM_JAX_MALLOC_TUNABLES=0` keeps
plain malloc everywhere.
"""

from __future__ import annotations

import os
import sys

TUNABLES = {
    "glibc.malloc.arena_max": "1",  # one heap for every thread (else a thread's arena mmaps big blocks)
    "glibc.malloc.mmap_max": "0",  # big blocks from the heap too, not from fresh mmaps
    "glibc.malloc.trim_threshold": str(64 << 30),  # never give the heap's top back to the kernel
}
FIRST_GLIBC = (2, 26)  # the first glibc with tunables


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this Python runs on, or None where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def supported(glibc: tuple[int, int] | None = None) -> bool:
    """Whether this machine's C library reads the tunables: Linux with glibc >= 2.26 (default:
    this Python's)."""
    glibc = glibc_version() if glibc is None else glibc
    return sys.platform.startswith("linux") and glibc is not None and glibc >= FIRST_GLIBC


def _tunables(env) -> dict[str, str]:
    pairs = (entry.partition("=") for entry in env.get("GLIBC_TUNABLES", "").split(":") if entry)
    return {name.strip(): value.strip() for name, _, value in pairs}


def configured(env=None) -> bool:
    """Whether $GLIBC_TUNABLES already sets any glibc.malloc tunable (someone tuned malloc: vlm_jax
    leaves it as it is)."""
    return any(name.startswith("glibc.malloc.") for name in _tunables(os.environ if env is None else env))


def active(env=None) -> bool:
    """Whether $GLIBC_TUNABLES holds every one of TUNABLES, with their values."""
    tunables = _tunables(os.environ if env is None else env)
    return all(tunables.get(name) == value for name, value in TUNABLES.items())


def wanted(env=None) -> bool:
    """False where $VLM_JAX_MALLOC_TUNABLES is 0 (plain malloc asked for), else True."""
    return (os.environ if env is None else env).get("VLM_JAX_MALLOC_TUNABLES", "1") != "0"


def environment(env=None, glibc: tuple[int, int] | None = None) -> dict:
    """A copy of `env` (default: os.environ) whose processes start with TUNABLES appended to
    $GLIBC_TUNABLES (its other tunables kept), where the machine `supported`s them, they are
    `wanted` and no malloc tunable is set yet. glibc: supported()'s argument (tests)."""
    env = dict(os.environ if env is None else env)
    if configured(env) or not wanted(env) or not supported(glibc):
        return env
    ours = ":".join(f"{name}={value}" for name, value in TUNABLES.items())
    env["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{ours}" if env.get("GLIBC_TUNABLES") else ours
    return env


def plain_environment(env=None) -> dict:
    """A copy of `env` (default: os.environ) whose processes run glibc's default malloc:
    TUNABLES taken out of $GLIBC_TUNABLES (other tunables kept) and $VLM_JAX_MALLOC_TUNABLES=0."""
    env = dict(os.environ if env is None else env, VLM_JAX_MALLOC_TUNABLES="0")
    kept = [f"{name}={value}" for name, value in _tunables(env).items() if name not in TUNABLES]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def restart_with_tunables(argv: list[str] | None = None) -> None:
    """Replaces this process by itself run with `environment()`, where that adds the tunables;
    otherwise returns at once. argv: the interpreter's arguments (default `sys.orig_argv[1:]`,
    the command line as given, -m and interpreter options included). Call it first thing in a
    script's main, before anything else has run: the process starts again from the top."""
    env = environment()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    argv = sys.orig_argv[1:] if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def status() -> str:
    """One line for reports: which malloc this process runs with."""
    if active() and supported():
        return "malloc: one never-trimmed heap (vlm_jax.host_memory tunables)"
    if configured():
        return f"malloc: GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    return "malloc: glibc defaults" if supported() else "malloc: not glibc (no tunables)"
