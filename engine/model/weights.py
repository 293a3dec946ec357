"""Reader of CTranslate2's ``model.bin`` (binary version 6), for our own T5 runtime.

The format is the one ``ctranslate2.specs.model_spec.ModelSpec._serialize`` writes: a header, each
variable as (name, shape, dtype id, byte count, raw bytes), then aliases (name -> name) for
variables that the converter found identical (shared embeddings, the relative attention bias of
layer 0 reused by every layer, layer norms with equal gammas). Only the file format is used here,
never CTranslate2 itself, so the runtime does not depend on its internals.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelError

MODEL_FILE = "model.bin"
SUPPORTED_BINARY_VERSION = 6
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelFile:
    """Every variable of a converted model, as stored (aliases resolved, no dequantization)."""

    spec_name: str
    revision: int
    variables: Mapping[str, np.ndarray]
    aliases: Mapping[str, str]

    def __contains__(self, name: object) -> bool:
        return name in self.variables or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        yield from self.variables
        yield from self.aliases

    def raw(self, name: str) -> np.ndarray:
        """The stored array (int8 stays int8, bfloat16 comes back as float32)."""
        target = self.aliases.get(name, name)
        try:
            return self.variables[target]
        except KeyError:
            raise ModelError(
                f"{MODEL_FILE} has no variable {name!r}; was it converted from a T5 model?"
            ) from None

    def scale_of(self, name: str) -> np.ndarray | None:
        """The per-row int8 scale of ``name`` (``<name>_scale``), following an alias of ``name``."""
        for candidate in (f"{name}_scale", f"{self.aliases.get(name, name)}_scale"):
            if candidate in self:
                return self.raw(candidate)
        return None

    def float32(self, name: str) -> np.ndarray:
        """``name`` as float32: int8 rows divided by their scale, float16/bfloat16 upcast."""
        value = self.raw(name)
        if value.dtype == np.int8:
            scale = self.scale_of(name)
            if scale is None:
                raise ModelError(f"{MODEL_FILE}: int8 variable {name!r} has no {name}_scale")
            rows = value.reshape(value.shape[0], -1).astype(np.float32)
            rows /= scale.astype(np.float32).reshape(-1, 1)
            return rows.reshape(value.shape)
        if value.dtype in (np.int16, np.int32):
            raise ModelError(
                f"{MODEL_FILE}: variable {name!r} is {value.dtype}, which this runtime does not read; "
                "convert the model with --quantization int8, float16, bfloat16 or float32"
            )
        return np.ascontiguousarray(value, dtype=np.float32)

    def scalar(self, name: str) -> float:
        return float(self.raw(name).reshape(()))


def read_model_file(model_dir: str | Path) -> ModelFile:
    path = Path(model_dir) / MODEL_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path} ({exc}); is {model_dir} a converted model folder?") from exc
    try:
        return _parse(data)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(
            f"{path} is truncated or not a CTranslate2 model file ({exc}); re-convert it"
        ) from exc


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return int(value)

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        text = self.data[self.offset : self.offset + length - 1].decode("utf-8")
        self.offset += length
        return text

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise ValueError(f"wanted {count} bytes at offset {self.offset}, file has {len(self.data)}")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk


def _parse(data: bytes) -> ModelFile:
    cur = _Cursor(data)
    version = cur.unpack("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise ModelError(
            f"{MODEL_FILE} has binary version {version}; this runtime reads version "
            f"{SUPPORTED_BINARY_VERSION} (CTranslate2 4.x): re-convert with the installed CTranslate2"
        )
    spec_name = cur.string()
    revision = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        shape = tuple(cur.unpack("I") for _ in range(cur.unpack("B")))
        type_id = cur.unpack("B")
        if type_id >= len(_DTYPES):
            raise ValueError(f"unknown dtype id {type_id} for {name}")
        raw = cur.take(cur.unpack("I"))
        variables[name] = _decode(raw, _DTYPES[type_id], shape)
    aliases: dict[str, str] = {}
    for _ in range(cur.unpack("I")):
        alias = cur.string()
        aliases[alias] = cur.string()
    return ModelFile(spec_name=spec_name, revision=revision, variables=variables, aliases=aliases)


def _decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":
        # bfloat16 is the upper half of a float32: widen by shifting into the high 16 bits.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()
