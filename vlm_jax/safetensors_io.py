"""Reading safetensors files one tensor at a time, bfloat16 included.

safetensors' numpy reader cannot return bfloat16 (the dtype of most LLaVA checkpoints), and
its mmap keeps every touched page of a shard resident while the file is open. The format
is a length-prefixed JSON header followed by raw little-endian bytes, so this module reads
the header, validates it against the file size (a truncated download fails here, naming
the file), and reads each tensor straight into a numpy buffer with ml_dtypes' bfloat16.
Writing goes through safetensors.numpy.save_file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from vlm_jax.errors import CorruptCheckpointError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorEntry:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """{tensor name: TensorEntry} of one .safetensors file, validated against its size."""
    size = os.path.getsize(path)
    fix = "Fix: download or save the checkpoint again (the file is incomplete or damaged)."
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path} is truncated: {size} bytes, not even a header. {fix}")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: its header needs {8 + header_len} bytes, the file has {size}. {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({e}). {fix}") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptCheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}. {fix}")
        if data_start + end > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes. {fix}"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
    return entries


class TensorReader:
    """Reads tensors by entry, keeping one open handle per file (no mmap)."""

    def __init__(self):
        self._files: dict[str, object] = {}

    def read(self, entry: TensorEntry) -> np.ndarray:
        f = self._files.get(entry.path)
        if f is None:
            f = self._files[entry.path] = open(entry.path, "rb")
        out = np.empty(entry.shape, entry.dtype)
        f.seek(entry.offset)
        got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != entry.nbytes:
            raise CorruptCheckpointError(f"{entry.path}: short read ({got} of {entry.nbytes} bytes)")
        return out

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
