"""Exceptions raised by vlm_jax.

Every error names the problem and the fix. They subclass ValueError (bad input) or
RuntimeError/OSError where that is the natural family, so callers can catch either the
vlm_jax class or the builtin one.
"""

from __future__ import annotations


class VlmJaxError(Exception):
    """Base class of every error vlm_jax raises on purpose."""


class InputError(VlmJaxError, ValueError):
    """The arrays given to the model do not fit the model (shape, ids, image count)."""


class UnsupportedArchitectureError(VlmJaxError, ValueError):
    """The checkpoint's config names an architecture vlm_jax does not implement."""


class SettingError(VlmJaxError, ValueError):
    """A setting names an option vlm_jax does not have (e.g. a rematerialisation policy)."""


class WeightsMismatchError(VlmJaxError, ValueError):
    """The tensors in a checkpoint do not match what the config says the model has.

    `missing`, `unexpected` and `mismatched` list every problem at once, so one run shows
    everything that is wrong with a folder.
    """

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=()):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)  # (name, expected_shape, found_shape)
        lines = [f"The weights in {source} do not match its config.json:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing tensor(s):")
            lines += [f"    - {name}" for name in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected tensor(s):")
            lines += [f"    - {name}" for name in self.unexpected]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} tensor(s) with the wrong shape:")
            lines += [
                f"    - {name}: expected {tuple(want)}, found {tuple(got)}"
                for name, want, got in self.mismatched
            ]
        lines.append(
            "Fix: make sure config.json belongs to these weights (same model size and vision "
            "tower), or re-download/re-save the checkpoint with transformers' save_pretrained."
        )
        super().__init__("\n".join(lines))


class CorruptCheckpointError(VlmJaxError, OSError):
    """A weights file is truncated or unreadable."""


class OutputExistsError(VlmJaxError, FileExistsError):
    """A command would overwrite an existing folder."""


class CheckpointMismatchError(VlmJaxError, ValueError):
    """A saved checkpoint belongs to a model of another shape."""
