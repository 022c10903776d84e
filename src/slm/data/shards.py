"""Token shard files: a 32-byte versioned header followed by raw little-endian tokens.

Layout (all little-endian):

    offset  size  field
    0       8     magic  b"SLMTOKS\\0"
    8       4     version (uint32, currently 1)
    12      4     itemsize (uint32: 2 = uint16 tokens, 4 = uint32 tokens)
    16      8     count (uint64: number of tokens that follow)
    24      8     reserved (zero)
    32      ...   count * itemsize bytes of tokens

The header makes a wrong file (magic), a future format (version) and a
truncated or padded file (size != 32 + count * itemsize) fail loudly instead of
being read as tokens. Shards are written to a temporary name and renamed when
complete, so a shard under its final name is always whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from slm.atomic import replace_file, tmp_name
from slm.errors import SlmError

MAGIC = b"SLMTOKS\0"
VERSION = 1
HEADER_SIZE = 32
_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, count, reserved
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype for a vocabulary: uint16 up to 65536 ids, else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


class ShardWriter:
    """Appends token arrays to a temporary file beside `path`; `close()` fills in the header and renames it."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.count = 0
        self._tmp = tmp_name(self.path)
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)  # real header written on close, once the count is known

    def write(self, tokens: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.count += len(tokens)

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count))
        self._f.close()
        replace_file(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking magic, version and file size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except OSError as e:
        raise SlmError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if len(raw) < HEADER_SIZE:
        raise SlmError(f"{path}: not a token shard (only {len(raw)} bytes, header is {HEADER_SIZE})")
    magic, version, itemsize, count = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise SlmError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise SlmError(f"{path}: shard format version {version}, this slm reads version {VERSION}")
    if itemsize not in _DTYPES:
        raise SlmError(f"{path}: unsupported token size {itemsize} bytes (expected 2 or 4)")
    expected = HEADER_SIZE + count * itemsize
    if size != expected:
        raise SlmError(
            f"{path}: {size} bytes on disk but the header promises {count} tokens ({expected} bytes): "
            "truncated or corrupt shard"
        )
    return _DTYPES[itemsize], count


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (read-only), validating its header first."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
