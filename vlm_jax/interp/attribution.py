"""Attribution: gradients of a scalar with respect to additive edits at a site.

`edit_gradient` returns d metric / d delta for an additive edit delta at every layer and
position of a site (zero delta: the model's own run), in one compiled forward + backward.
`attribution_patching` turns it into the first-order estimate of patching every activation
from a clean run into a corrupted one: (clean - corrupt) . gradient (Nanda's attribution
patching), per layer and position.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vlm_jax.interp.edits import Edits, check_site
from vlm_jax.models import llava


def logit_difference(position: int, good: int, bad: int, row: int | None = None) -> Callable:
    """metric(Output) = logit[good] - logit[bad] at `position` (summed over rows, or one row)."""

    def metric(out: llava.Output) -> jax.Array:
        diff = out.logits[:, position, good] - out.logits[:, position, bad]
        return jnp.sum(diff) if row is None else diff[row]

    return metric


def _site_shape(model, arrays, site):
    out = jax.eval_shape(lambda p: llava.forward(p, model.config, arrays, capture=(site,)), model.params)
    return out.acts[site]


def edit_gradient(model, inputs, metric: Callable, site: str, *, edits: Edits | None = None):
    """(metric value, gradient [same shape as the captured site]) of metric(forward) with
    respect to an additive edit at `site`, taken at zero (on top of `edits`, if given).

    metric: fn(Output) -> scalar, e.g. logit_difference(...). It is a static argument of the
    compiled function: reuse the same metric object to avoid recompiling."""
    check_site(site)
    arrays = model._arrays(inputs)
    shape = _site_shape(model, arrays, site)
    base = edits if edits is not None else model.edits()
    model._check_edits(base, arrays, False)
    return _grad_jit(model.params, model.config, arrays, base, jnp.zeros(shape.shape, shape.dtype), site, metric)


def _value_and_grad(params, config, arrays, base, delta, site, metric):
    def f(d):
        return metric(llava.forward(params, config, arrays, edits=base.add(site, d)))

    return jax.value_and_grad(f)(delta)


_grad_jit = jax.jit(_value_and_grad, static_argnames=("config", "site", "metric"))


def attribution_patching(model, clean, corrupt, metric: Callable, site: str):
    """[L, B, T] (or the site's leading axes) first-order effect on metric of patching `site`
    from the clean run into the corrupted one: sum over width of (clean - corrupt) * grad,
    the gradient taken on the corrupted run."""
    clean_act = model.run(clean, capture=(site,)).acts[site]
    corrupt_act = model.run(corrupt, capture=(site,)).acts[site]
    _, grad = edit_gradient(model, corrupt, metric, site)
    return jnp.sum((clean_act - corrupt_act) * grad, axis=-1)  # per head for q/k/v/z
