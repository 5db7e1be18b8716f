"""vlm_jax.host_memory: glibc malloc tunables for the processes vlm_jax starts, and their effect."""

import os
import subprocess
import sys
import textwrap

import pytest

from vlm_jax import host_memory

GLIBC = (2, 36)
OURS = ":".join(f"{name}={value}" for name, value in host_memory.TUNABLES.items())


def test_environment_appends_the_tunables_and_keeps_the_others():
    env = host_memory.environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "PATH": "/bin"}, glibc=GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.nns=2:" + OURS
    assert env["PATH"] == "/bin"
    assert host_memory.environment({}, glibc=GLIBC)["GLIBC_TUNABLES"] == OURS
    assert host_memory.active(env) and not host_memory.active({})


def test_plain_environment_takes_out_only_the_tunables_it_adds():
    tuned = host_memory.environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, glibc=GLIBC)
    plain = host_memory.plain_environment(tuned)
    assert plain["GLIBC_TUNABLES"] == "glibc.rtld.nns=2" and plain["VLM_JAX_MALLOC_TUNABLES"] == "0"
    assert "GLIBC_TUNABLES" not in host_memory.plain_environment(host_memory.environment({}, glibc=GLIBC))
    assert host_memory.environment(plain, glibc=GLIBC) == plain  # and nothing adds them back


@pytest.mark.parametrize("env, glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC),  # someone tuned malloc already
    ({"VLM_JAX_MALLOC_TUNABLES": "0"}, GLIBC),  # plain malloc asked for
    ({}, (2, 17)),  # a glibc without tunables
])
def test_environment_leaves_the_tunables_alone(env, glibc):
    assert host_memory.environment(env, glibc=glibc).get("GLIBC_TUNABLES") == env.get("GLIBC_TUNABLES")


RESTART = textwrap.dedent("""
    import os, sys
    from vlm_jax import host_memory
    print("run", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
    host_memory.restart_with_tunables()
    print("done", host_memory.status())
""")


def _plain_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLM_JAX_MALLOC_TUNABLES")}


def test_restart_runs_the_same_command_again_with_the_tunables(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(RESTART)
    out = subprocess.run([sys.executable, "-u", str(script), "a", "b"], capture_output=True, text=True, check=True,
                         env=_plain_env()).stdout.splitlines()
    if not host_memory.supported():
        assert len(out) == 2 and out[0] == "run ['a', 'b'] None"  # no restart
        return
    assert out[:2] == ["run ['a', 'b'] None", f"run ['a', 'b'] {OURS}"]  # once, same arguments
    assert out[2] == "done malloc: one never-trimmed heap (vlm_jax.host_memory tunables)"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         env=dict(_plain_env(), VLM_JAX_MALLOC_TUNABLES="0")).stdout.splitlines()
    assert len(out) == 2 and out[1] == "done malloc: glibc defaults"


FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    for round in range(2):  # a buffer freed, then one of the same size (XLA's outputs, call after call)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(ctypes.c_size_t(size))
        ctypes.memset(block, round, size)  # touches every page
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(block)
    print(faults)
""")


@pytest.mark.skipif(not host_memory.supported(), reason="no glibc >= 2.26 here")
def test_the_tunables_reuse_a_freed_buffer_without_page_faults():
    """What they are for: a 64 MB block malloc'ed after one of the same size was freed costs 16k
    page faults with glibc's defaults (a fresh mmap) and none with the tunables."""
    def faults(env):
        return int(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                                  env=env).stdout.strip())

    plain, tuned = faults(_plain_env()), faults(host_memory.environment(_plain_env()))
    assert plain > 8000, plain
    assert tuned < 100, tuned
