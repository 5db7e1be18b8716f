"""What changes when one program runs on several hosts (jax.distributed): moving results to
the host, and which process writes files.

On one host every helper here is a plain pass-through. With several processes, an array whose
shards live on other hosts' devices cannot be read with np.asarray; `to_host` gathers it (a
collective: every process must call it at the same point). Files are written by process 0
alone (`is_writer`), and decisions made from what process 0 reads on its disk (resume
progress, a mismatched folder) are sent to every process (`from_writer`), so all processes
take the same branch and no collective is left waiting.
"""

from __future__ import annotations

import jax
import numpy as np


def is_writer() -> bool:
    """True in the process that writes files (process 0; the only process on one host)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A jax.Array (possibly split over several hosts' devices) as one numpy array, on every
    process. Fully replicated or single-host arrays are read directly."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_writer(value):
    """`value` as process 0 has it, on every process (numbers, booleans, numpy arrays)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(np.asarray(value))
    return out.item() if np.ndim(out) == 0 and not isinstance(value, np.ndarray) else np.asarray(out)
