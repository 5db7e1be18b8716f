"""Huge pages for the host buffers XLA CPU (and PyTorch) allocate on every call.

XLA CPU allocates each call's outputs and its temporary buffer with malloc. glibc serves blocks of
more than 32 MB with fresh mmaps, so every call page-faults them in 4 KB at a time: a batch-1
forward's logits [1, 601, 32064] (77 MB) are 19.4k page faults, ~17 ms of a 160 ms forward, and at
batch 4 ~75 ms of 630 (benchmarks/RESULTS.md). With the glibc (>= 2.35) tunable
`glibc.malloc.hugetlb=1`, malloc asks for transparent huge pages for those blocks (madvise): 512
times fewer faults, and the forward runs 10-12% faster.

glibc reads its tunables when a process starts, so they cannot be switched on from inside Python.
This module sets them for the processes it starts (`environment`), or restarts the current one with
them (`restart_with_huge_pages`, what the `vlm-jax` command, experiments/run_all.py and the
benchmarks do). In your own scripts and notebooks, start Python with

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...

`VLM_JAX_HUGE_PAGES=0` keeps plain malloc everywhere (as for measuring without).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this Python runs on, or None where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def transparent_huge_pages(setting: str = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        with open(setting) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def supported(glibc: tuple[int, int] | None = None, thp: str | None = None) -> bool:
    """Whether the tunable gives this machine's mallocs huge pages: Linux, glibc >= 2.35, and
    transparent huge pages in "madvise" or "always" mode (defaults: this machine's)."""
    if not sys.platform.startswith("linux"):
        return False
    glibc = glibc_version() if glibc is None else glibc
    thp = transparent_huge_pages() if thp is None else thp
    return glibc is not None and glibc >= FIRST_GLIBC and thp in ("madvise", "always")


def requested(env=None) -> bool:
    """Whether the environment asks glibc for huge pages (glibc.malloc.hugetlb set to 1 or 2)."""
    env = os.environ if env is None else env
    for entry in env.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = entry.partition("=")
        if name.strip() == TUNABLE and value.strip() in ("1", "2"):
            return True
    return False


def wanted(env=None) -> bool:
    """False where $VLM_JAX_HUGE_PAGES is 0 (plain malloc asked for), else True."""
    env = os.environ if env is None else env
    return env.get("VLM_JAX_HUGE_PAGES", "1") != "0"


def environment(env=None, **support) -> dict:
    """A copy of `env` (default: os.environ) whose processes malloc with huge pages: the tunable
    appended to $GLIBC_TUNABLES (its other tunables kept), where the machine `supported`s it,
    it is `wanted` and not already set. `support`: supported()'s arguments (tests)."""
    env = dict(os.environ if env is None else env)
    if requested(env) or not wanted(env) or not supported(**support):
        return env
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def restart_with_huge_pages(argv: list[str] | None = None) -> None:
    """Replaces this process by itself run with `environment()`, where that adds the tunable;
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
    """One line for reports: whether this process mallocs with huge pages, and why not."""
    glibc, thp = glibc_version(), transparent_huge_pages()
    where = f"glibc {'.'.join(map(str, glibc)) if glibc else 'n/a'}, THP {thp or 'n/a'}, {platform.system()}"
    if requested() and supported():
        return f"malloc huge pages on ({TUNABLE}=1; {where})"
    if requested():
        return f"malloc huge pages asked for but not available ({where})"
    return f"malloc huge pages off ({where})"
