"""A compact L-BFGS for small smooth convex problems (probe fitting), jit- and vmap-friendly.

Why not optax.lbfgs: a probe's gradient is X^T (softmax - Y); written by hand with a
pre-transposed X^T it is ~15x cheaper on CPU than what autodiff produces (XLA transposes X on
every call), and optax's line search differentiates the loss itself. This minimiser takes a
hand-written value_and_grad over a flat parameter vector; it uses the two-loop recursion with
the last `memory` curvature pairs and a backtracking Armijo line search, and stops when the
largest gradient entry is below `tol` (scikit-learn's lbfgs criterion) or after `max_iter`
iterations. It also reports how many iterations and loss evaluations it took (the
evaluations are the cost: each is a pass over the data).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


MEMORY = 10  # curvature pairs kept
MAX_BACKTRACKS = 20  # step halvings per line search


def minimize(value_and_grad: Callable, x0: jax.Array, *, max_iter: int = 200, tol: float = 1e-4,
             memory: int = MEMORY, max_backtracks: int = MAX_BACKTRACKS) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimises f from x0 [n]; value_and_grad(x) -> (f [], g [n]).

    Returns (x [n], iterations [] int32, evaluations [] int32: calls of value_and_grad).
    probe/cpu_kernel.logistic_fit runs this algorithm step for step in C++ for logistic probes on
    CPU: a change here must be made there too (vlm_jax/native/logistic_probe.cc, LogisticFitImpl)."""
    n = x0.shape[0]
    # Keep x0 opaque to XLA: with a constant (e.g. zeros) starting point, XLA CPU (jaxlib 0.10)
    # miscompiles the fused dot + reduction of the first evaluation (max over X @ 0 gave -inf).
    x0 = jax.lax.optimization_barrier(x0)
    f0, g0 = value_and_grad(x0)
    dtype = x0.dtype
    state = dict(
        x=x0, f=f0, g=g0, k=jnp.int32(0), m=jnp.int32(0), evals=jnp.int32(1),  # k: iterations, m: stored pairs
        S=jnp.zeros((memory, n), dtype), Y=jnp.zeros((memory, n), dtype), rho=jnp.zeros((memory,), dtype),
    )

    def direction(state):
        """-H g by the two-loop recursion over the stored pairs, newest first. Unused slots have
        rho = 0 and drop out. Unrolled over the `memory` slots: on CPU this is ~3x cheaper per
        iteration than the compact (matrix) form, whose small solves and gathers each cost a
        kernel launch."""
        S, Y, rho, g = state["S"], state["Y"], state["rho"], state["g"]
        newest = (state["m"] - 1) % memory  # a stored pair whenever m > 0
        yy = jnp.dot(Y[newest], Y[newest])
        gamma = jnp.where((state["m"] > 0) & (yy > 0), jnp.dot(S[newest], Y[newest]) / jnp.maximum(yy, 1e-30), 1.0)
        q, alphas = g, []
        for i in range(memory):
            slot = (state["m"] - 1 - i) % memory
            alpha = rho[slot] * jnp.dot(S[slot], q)
            q = q - alpha * Y[slot]
            alphas.append((slot, alpha))
        r = gamma * q
        for slot, alpha in reversed(alphas):
            beta = rho[slot] * jnp.dot(Y[slot], r)
            r = r + (alpha - beta) * S[slot]
        return -r

    def not_done(state):
        return (state["k"] < max_iter) & (jnp.max(jnp.abs(state["g"])) > tol)

    def step(state):
        d = direction(state)
        slope = jnp.dot(d, state["g"])
        descent = slope < 0
        d = jnp.where(descent, d, -state["g"])  # not a descent direction: steepest descent
        slope = jnp.where(descent, slope, -jnp.dot(state["g"], state["g"]))
        # the first step of a run has no curvature information: keep it small
        t0 = jnp.where(state["m"] == 0, jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.max(jnp.abs(state["g"])), 1e-12)), 1.0)

        def armijo_fails(ls):
            t, f_new, _, tries = ls
            return (f_new > state["f"] + 1e-4 * t * slope) & (tries < max_backtracks)

        def shrink(ls):
            t, _, _, tries = ls
            t = t * 0.5
            f_new, g_new = value_and_grad(state["x"] + t * d)
            return t, f_new, g_new, tries + 1

        f1, g1 = value_and_grad(state["x"] + t0 * d)
        t, f_new, g_new, backtracks = jax.lax.while_loop(armijo_fails, shrink, (t0, f1, g1, jnp.int32(0)))
        s = t * d
        y = g_new - state["g"]
        sy = jnp.dot(s, y)
        slot = state["m"] % memory
        keep = sy > 1e-10  # curvature condition; skip the pair otherwise
        S = jnp.where(keep, state["S"].at[slot].set(s), state["S"])
        Y = jnp.where(keep, state["Y"].at[slot].set(y), state["Y"])
        rho = jnp.where(keep, state["rho"].at[slot].set(1.0 / jnp.where(keep, sy, 1.0)), state["rho"])
        return dict(x=state["x"] + s, f=f_new, g=g_new, k=state["k"] + 1, m=state["m"] + keep.astype(jnp.int32),
                    evals=state["evals"] + 1 + backtracks, S=S, Y=Y, rho=rho)

    final = jax.lax.while_loop(not_done, step, state)
    return final["x"], final["k"], final["evals"]
