"""A compact L-BFGS for small smooth convex problems (probe fitting), jit- and vmap-friendly.

Why not optax.lbfgs: a probe's gradient is X^T (softmax - Y); written by hand with a
pre-transposed X^T it is ~15x cheaper on CPU than what autodiff produces (XLA transposes X on
every call), and optax's line search differentiates the loss itself. This minimiser takes a
hand-written value_and_grad over a flat parameter vector; it uses the two-loop recursion with
the last `memory` curvature pairs and a backtracking Armijo line search, and stops when the
largest gradient entry is below `tol` (scikit-learn's lbfgs criterion) or after `max_iter`
iterations.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def minimize(value_and_grad: Callable, x0: jax.Array, *, max_iter: int = 200, tol: float = 1e-4,
             memory: int = 10, max_backtracks: int = 20) -> tuple[jax.Array, jax.Array]:
    """Minimises f from x0 [n]; value_and_grad(x) -> (f [], g [n]). Returns (x, iterations)."""  # noqa
    n = x0.shape[0]
    # Keep x0 opaque to XLA: with a constant (e.g. zeros) starting point, XLA CPU (jaxlib 0.10)
    # miscompiles the fused dot + reduction of the first evaluation (max over X @ 0 gave -inf).
    x0 = jax.lax.optimization_barrier(x0)
    f0, g0 = value_and_grad(x0)
    dtype = x0.dtype
    state = dict(
        x=x0, f=f0, g=g0, k=jnp.int32(0), m=jnp.int32(0),  # k: iterations, m: stored pairs
        S=jnp.zeros((memory, n), dtype), Y=jnp.zeros((memory, n), dtype), rho=jnp.zeros((memory,), dtype),
    )

    def direction(state):
        """-H g from the stored pairs in the compact form of Byrd, Nocedal and Schnabel:
        H g = gamma g + S p + gamma Y q with p, q from two m x m triangular solves, i.e. a few
        matrix products instead of the 4m vector operations of the two-loop recursion. The
        ring buffer is put in age order on the small m-sized quantities only."""
        S, Y, g = state["S"], state["Y"], state["g"]
        age = (state["m"] + jnp.arange(memory)) % memory  # slots, oldest first (unused ones lead)
        valid = state["rho"][age] != 0
        SY = (S @ Y.T)[age][:, age]  # SY[i, j] = s_i . y_j in age order
        newest = age[-1]
        yy_new = jnp.dot(Y[newest], Y[newest])
        gamma = jnp.where((state["m"] > 0) & (yy_new > 0), SY[-1, -1] / jnp.maximum(yy_new, 1e-30), 1.0)
        both = valid[:, None] & valid[None, :]
        eye = jnp.eye(memory, dtype=g.dtype)
        R = jnp.where(both, jnp.triu(SY), 0.0) + jnp.where(valid, 0.0, 1.0) * eye
        diag = jnp.where(valid, jnp.diagonal(SY), 0.0)
        Yg = (Y @ g)[age]
        a, c = (S @ g)[age], gamma * Yg
        u = jax.scipy.linalg.solve_triangular(R, a, lower=False)
        YY = (Y @ Y.T)[age][:, age]
        middle = diag * u + gamma * (YY @ u) - c
        p = jax.scipy.linalg.solve_triangular(R, middle, lower=False, trans="T")
        in_slots = jnp.zeros((memory, 2), g.dtype).at[age].set(jnp.stack([p, -gamma * u], axis=1))
        return -(gamma * g + S.T @ in_slots[:, 0] + Y.T @ in_slots[:, 1])

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
        t, f_new, g_new, _ = jax.lax.while_loop(armijo_fails, shrink, (t0, f1, g1, jnp.int32(0)))
        s = t * d
        y = g_new - state["g"]
        sy = jnp.dot(s, y)
        slot = state["m"] % memory
        keep = sy > 1e-10  # curvature condition; skip the pair otherwise
        S = jnp.where(keep, state["S"].at[slot].set(s), state["S"])
        Y = jnp.where(keep, state["Y"].at[slot].set(y), state["Y"])
        rho = jnp.where(keep, state["rho"].at[slot].set(1.0 / jnp.where(keep, sy, 1.0)), state["rho"])
        return dict(x=state["x"] + s, f=f_new, g=g_new, k=state["k"] + 1, m=state["m"] + keep.astype(jnp.int32),
                    S=S, Y=Y, rho=rho)

    final = jax.lax.while_loop(not_done, step, state)
    return final["x"], final["k"]
