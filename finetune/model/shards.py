"""Safetensors files read and written one tensor at a time, with plain file reads and writes.

`safetensors` maps whole files into memory (their pages count in the resident set) and `save_file`
wants every tensor of a file in memory at once. Export only needs one tensor at a time, so here a
file's header is parsed and checked against the file's size, tensors are read with `seek`/`readinto`,
and an output file is written from a header planned in advance (names, dtypes, shapes), each tensor's
bytes appended as it is produced. Unchanged tensors are copied in fixed-size chunks, byte for byte.
The format: an 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple
of 8), then the tensors' bytes back to back in the order of their `data_offsets`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit
_CHUNK = 64 << 20  # bytes per read/write when copying a tensor through


class BadFile(ValueError):
    """The file is not a complete safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    path: Path
    key: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: str | Path) -> dict[str, Entry]:
    """The tensors of a safetensors file in file order; raises BadFile unless the file is complete."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFile(f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise BadFile(
                f"header length {n} does not fit in the file ({size} bytes): truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadFile(f"header is not JSON ({err}): corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise BadFile("header is not a JSON object")
    entries: list[Entry] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise BadFile(f"tensor {key!r}: malformed header entry {info!r}") from None
        if dtype not in DTYPES:
            raise BadFile(f"tensor {key!r}: dtype {dtype} is not supported")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise BadFile(f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        entries.append(Entry(path, key, dtype, shape, 8 + n + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    position = 8 + n
    for entry in entries:
        if entry.start != position:
            raise BadFile(f"tensor {entry.key!r}: data offsets overlap or leave a gap")
        position += entry.nbytes
    if position != size:
        raise BadFile(f"header describes {position} bytes, the file has {size}: truncated or corrupt")
    return {e.key: e for e in entries}


class Reader:
    """Reads tensors of any number of safetensors files; one open handle per file, no memory mapping."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def _file(self, path: Path) -> BinaryIO:
        if path not in self._files:
            self._files[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
        return self._files[path]

    def tensor(self, entry: Entry) -> torch.Tensor:
        """A fresh CPU tensor (owning its memory) with the entry's bytes."""
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.torch_dtype)
        f = self._file(entry.path)
        f.seek(entry.start)
        buffer = bytearray(entry.nbytes)
        if f.readinto(buffer) != entry.nbytes:
            raise BadFile(f"{entry.path}: file ended inside tensor {entry.key!r}")
        return torch.frombuffer(buffer, dtype=entry.torch_dtype).reshape(entry.shape)

    def copy(self, entry: Entry, out: Writer) -> None:
        """Append the entry's bytes to `out` unchanged, a chunk at a time."""
        f = self._file(entry.path)
        f.seek(entry.start)
        left = entry.nbytes
        out.begin(entry.key, entry.dtype, entry.shape)
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise BadFile(f"{entry.path}: file ended inside tensor {entry.key!r}")
            out.append(chunk)
            left -= len(chunk)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class Writer:
    """Writes one safetensors file whose tensors (name, dtype code, shape) are known before any data."""

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for key, dtype, shape in plan:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((key, dtype, tuple(shape), nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(len(text).to_bytes(8, "little") + text)
        self._next = 0
        self._left = 0

    def begin(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._left:
            raise RuntimeError(f"{self.path}: previous tensor incomplete before {key!r}")
        want = self._expected[self._next]
        if want[:3] != (key, dtype, tuple(shape)):
            raise RuntimeError(f"{self.path}: expected {want[:3]}, got {(key, dtype, tuple(shape))}")
        self._next += 1
        self._left = want[3]

    def append(self, data: bytes | memoryview) -> None:
        if len(data) > self._left:
            raise RuntimeError(
                f"{self.path}: too many bytes for tensor {self._expected[self._next - 1][0]!r}"
            )
        self._f.write(data)
        self._left -= len(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append a whole tensor (its dtype and shape must be the planned ones)."""
        self.begin(key, CODES[tensor.dtype], tuple(tensor.shape))
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.append(memoryview(data))

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._expected) or self._left:
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self._expected)} tensors")
