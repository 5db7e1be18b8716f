"""vlm_jax.host_memory: glibc's huge-page tunable for the processes vlm_jax starts, and its effect."""

import os
import subprocess
import sys
import textwrap

import pytest

from vlm_jax import host_memory

ON = {"glibc": (2, 36), "thp": "madvise"}


def test_environment_appends_the_tunable_and_keeps_the_others():
    env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}, **ON)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin"
    assert host_memory.environment({}, **ON)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("env, support", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, ON),  # already asked for (hugetlbfs pages)
    ({"VLM_JAX_HUGE_PAGES": "0"}, ON),  # plain malloc asked for
    ({}, {"glibc": (2, 31), "thp": "madvise"}),  # glibc without the tunable
    ({}, {"glibc": (2, 36), "thp": "never"}),  # huge pages off in the kernel
])
def test_environment_leaves_the_tunables_alone(env, support):
    assert host_memory.environment(env, **support).get("GLIBC_TUNABLES") == env.get("GLIBC_TUNABLES")


def test_requested_reads_the_tunable_value():
    assert host_memory.requested({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"})
    assert not host_memory.requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host_memory.requested({})


def test_transparent_huge_pages_reads_the_bracketed_mode(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_pages(str(setting)) == "madvise"
    assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) is None


RESTART = textwrap.dedent("""
    import os, sys
    from vlm_jax import host_memory
    print("run", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
    host_memory.restart_with_huge_pages()
    print("done", host_memory.status())
""")


def _plain_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLM_JAX_HUGE_PAGES")}


def test_restart_runs_the_same_command_again_with_the_tunable(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(RESTART)
    out = subprocess.run([sys.executable, "-u", str(script), "a", "b"], capture_output=True, text=True, check=True,
                         env=_plain_env()).stdout.splitlines()
    if not host_memory.supported():
        assert len(out) == 2 and out[0] == "run ['a', 'b'] None" and "off" in out[1]  # no restart
        return
    assert out[:2] == ["run ['a', 'b'] None", "run ['a', 'b'] glibc.malloc.hugetlb=1"]  # once, same arguments
    assert out[2].startswith("done malloc huge pages on")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         env=dict(_plain_env(), VLM_JAX_HUGE_PAGES="0")).stdout.splitlines()
    assert len(out) == 2 and "off" in out[1]


FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)  # touches every page
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not host_memory.supported(), reason="no glibc >= 2.35 with transparent huge pages here")
def test_huge_pages_cut_the_page_faults_of_a_fresh_block():
    """What the tunable is for: a fresh 64 MB malloc block (as XLA's buffers for every call) costs
    16k page faults with 4 KB pages and a few dozen with huge pages."""
    def faults(env):
        return int(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                                  env=env).stdout.strip())

    plain, huge = faults(_plain_env()), faults(host_memory.environment(_plain_env()))
    assert plain > 8000, plain
    assert huge < plain / 4, (huge, plain)
