"""Read and write safetensors files with numpy alone (no torch), one tensor at a time.

Writing streams tensors to disk as they are made, so a large demo checkpoint never has to sit in
memory whole; reading memory-maps the file and converts bfloat16 (which numpy lacks) to float32.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.errors import ModelError

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # read as raw 16-bit words, widened to float32 on access
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, shape and a function that makes its float32 values."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write_safetensors(path: Path, plans: Sequence[TensorPlan]) -> None:
    """Write float32 tensors in ``plans`` order, calling each ``make`` just before its bytes are needed."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        nbytes = 4 * int(np.prod(plan.shape, dtype=np.int64))
        header[plan.name] = {
            "dtype": "F32",
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for plan in plans:
            _write_tensor(f, plan)


def _write_tensor(f: BinaryIO, plan: TensorPlan) -> None:
    value = np.ascontiguousarray(plan.make(), dtype="<f4")
    if value.shape != plan.shape:
        raise ValueError(f"{plan.name}: made shape {value.shape}, planned {plan.shape}")
    f.write(value.tobytes())


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` returns a float32/float16 numpy array."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelError(f"{path} is not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(_MAX_HEADER_BYTES, size - 8):
                    raise ModelError(f"{path} is corrupt: its header claims {header_len} bytes of {size}")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
        if not isinstance(header, dict):
            raise ModelError(f"{path} is corrupt: its header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = str(entry["dtype"])
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{path} is corrupt: bad header entry for {name!r}") from exc
            if dtype not in _NUMPY_DTYPES:
                raise ModelError(
                    f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(_NUMPY_DTYPES)}"
                )
            expected = _NUMPY_DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
            if not 0 <= begin <= end <= self._data_len or end - begin != expected:
                raise ModelError(
                    f"{path} is corrupt or truncated: tensor {name!r} needs bytes {begin}..{end} "
                    f"of a {self._data_len}-byte data section"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def names(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        count = (end - begin) // _NUMPY_DTYPES[dtype].itemsize
        # Read, not memory-map: mapped pages would count in the process's memory next to the
        # converted copies, and a large checkpoint would need twice its size.
        with self.path.open("rb") as f:
            f.seek(self._data_start + begin)
            values = np.fromfile(f, dtype=_NUMPY_DTYPES[dtype], count=count)
        if values.size != count:
            raise ModelError(f"{self.path} is truncated: tensor {name!r} is incomplete")
        if dtype == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(values.dtype.newbyteorder("="), copy=False).reshape(shape)
