"""Read a CTranslate2 `model.bin` into numpy arrays, without CTranslate2 itself.

Layout (binary versions 2 to 6, written by ctranslate2.specs.model_spec): u32 version; string
spec name; u32 revision; u32 variable count; per variable a string name, u8 rank, u32 per
dimension, u8 dtype id, u32 byte count and the raw little-endian data; then (version >= 3) u32
alias count and (alias, target) string pairs. A string is a u16 length that counts a trailing
NUL, then the bytes and the NUL. Quantised weights keep `<name>_scale` beside them
(float weight = integer weight / scale): `dequantize` applies it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_BINARY_VERSION = 6
# Order of the DataType enum in CTranslate2's include/ctranslate2/types.h.
DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
          4: np.dtype("<f2"), 5: "bfloat16"}
_V3_ITEM_SIZE_DTYPES = {4: np.dtype("<f4"), 2: np.dtype("<f2"), 1: np.dtype("i1")}


class CT2FormatError(ValueError):
    pass


@dataclass
class CT2Model:
    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> target, already resolved


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.offset = data, path, 0

    def fail(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.path}: {what} at byte offset {self.offset} "
                              f"(file is {len(self.data)} bytes); not a valid CTranslate2 model.bin")

    def take(self, n: int, what: str) -> bytes:
        if self.offset + n > len(self.data):
            raise self.fail(f"file ends inside {what} (needs {n} bytes)")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("H", f"the length of {what}")
        raw = self.take(length, what)
        if length == 0 or raw[-1] != 0:
            raise self.fail(f"{what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8") from exc


def _read_variable(r: _Reader, version: int) -> tuple[str, np.ndarray]:
    name = r.string("a variable name")
    (rank,) = r.unpack("B", f"the rank of {name!r}")
    shape = r.unpack(f"{rank}I", f"the shape of {name!r}") if rank else ()
    if version >= 4:
        type_id, num_bytes = r.unpack("BI", f"the dtype and size of {name!r}")
        if type_id not in DTYPES:
            raise r.fail(f"variable {name!r} has unknown dtype id {type_id} (known: "
                         f"{sorted(DTYPES)} = f32, i8, i16, i32, f16, bf16)")
        dtype = DTYPES[type_id]
    else:
        item_size, count = r.unpack("BI", f"the item size and count of {name!r}")
        if item_size not in _V3_ITEM_SIZE_DTYPES:
            raise r.fail(f"variable {name!r} has unknown item size {item_size}")
        dtype, num_bytes = _V3_ITEM_SIZE_DTYPES[item_size], count * item_size
    item_size = 2 if dtype == "bfloat16" else dtype.itemsize
    expected = int(np.prod(shape, dtype=np.int64)) * item_size
    if num_bytes != expected:
        raise r.fail(f"variable {name!r} of shape {list(shape)} and {item_size}-byte items "
                     f"declares {num_bytes} bytes, expected {expected}")
    raw = r.take(num_bytes, f"the data of {name!r}")
    if dtype == "bfloat16":
        array = bfloat16_to_float32(np.frombuffer(raw, dtype="<u2"))
    else:
        array = np.frombuffer(raw, dtype=dtype)  # a read-only view: no second copy of the file
    return name, array.reshape(shape)


def read_model_bin(path: str | Path) -> CT2Model:
    """All variables of a model.bin (bf16 widened to f32, others as stored, read-only), aliases
    resolved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CTranslate2 model file")
    r = _Reader(path.read_bytes(), path)
    (version,) = r.unpack("I", "the binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise r.fail(f"binary version {version} is not supported (this reader knows 1 to "
                     f"{MAX_BINARY_VERSION})")
    spec, revision = "", 1
    if version >= 2:
        spec = r.string("the spec name")
        (revision,) = r.unpack("I", "the spec revision")
    (count,) = r.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name, array = _read_variable(r, version)
        if name in variables:
            raise r.fail(f"variable {name!r} appears twice")
        variables[name] = array
    aliases: dict[str, str] = {}
    if version >= 3:
        (n_aliases,) = r.unpack("I", "the alias count")
        for _ in range(n_aliases):
            alias = r.string("an alias name")
            aliases[alias] = r.string(f"the target of alias {alias!r}")
    if r.offset != len(r.data):
        raise r.fail(f"{len(r.data) - r.offset} unexpected trailing bytes")
    for alias, target in aliases.items():
        seen = {alias}
        while target in aliases and target not in seen:  # an alias of an alias
            seen.add(target)
            target = aliases[target]
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias!r} points to {target!r}, "
                                 f"which is not a variable of the file")
        variables[alias] = variables[target]
        # An alias is the same variable, scale included, even when the scale has no alias.
        if target + "_scale" in variables and alias + "_scale" not in variables:
            variables[alias + "_scale"] = variables[target + "_scale"]
    return CT2Model(spec, revision, version, variables, aliases)


def dequantize(variables: dict[str, np.ndarray], path: str | Path = "model.bin") -> dict[str, np.ndarray]:
    """Float32 copies of every float or quantised variable (integer weight / `<name>_scale`).

    Scales are dropped from the result. An integer variable without a scale (a config scalar such
    as `encoder/num_heads`) is kept as it is.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[:-len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None:
            if value.dtype.kind != "i":
                raise CT2FormatError(f"{path}: {name!r} has a scale but dtype {value.dtype}")
            scale = scale.astype(np.float32)
            if scale.ndim == 1:  # one scale per output row (int8): broadcast over the rest
                if scale.shape[0] != value.shape[0]:
                    raise CT2FormatError(f"{path}: {name + '_scale'!r} has {scale.shape[0]} "
                                         f"values for {value.shape[0]} rows of {name!r}")
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            elif scale.ndim != 0:
                raise CT2FormatError(f"{path}: {name + '_scale'!r} has shape {list(scale.shape)}")
            if np.any(scale == 0):
                raise CT2FormatError(f"{path}: {name + '_scale'!r} contains a zero")
            out[name] = value.astype(np.float32) / scale
        elif value.dtype.kind == "f":
            out[name] = value.astype(np.float32)
        else:
            out[name] = value
    return out
