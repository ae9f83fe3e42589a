"""Read and write safetensors files one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Writing the header first and the tensors after lets
a merge stream a shard without holding it, and copy untouched tensors byte for byte.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CHUNK = 8 << 20


class ByteMeter:
    """Counts the bytes of tensor data a merge holds at once (the test of its memory bound)."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0

    def hold(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        self.held -= n

    def transient(self, n: int) -> None:
        """`n` bytes held for a moment on top of what is held (a tensor read or computed, then written)."""
        self.peak = max(self.peak, self.held + n)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__ plus it under "__metadata__", offset where tensor data starts)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def tensors_in_order(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def read_tensor(f: BinaryIO, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    start, end = entry["data_offsets"]
    f.seek(data_start + start)
    raw = bytearray(end - start)
    if f.readinto(raw) != len(raw):
        raise OSError(f"{getattr(f, 'name', 'file')}: truncated at {entry}")
    flat = torch.frombuffer(raw, dtype=DTYPES[entry["dtype"]]) if raw else torch.empty(0, dtype=DTYPES[entry["dtype"]])
    return flat.reshape(entry["shape"])


def copy_bytes(src: BinaryIO, dst: BinaryIO, start: int, length: int, meter: ByteMeter, digest: Any = None) -> None:
    """Copy a byte range in chunks, feeding each chunk to `digest` (a hashlib object) when given."""
    src.seek(start)
    while length:
        chunk = src.read(min(CHUNK, length))
        meter.hold(len(chunk))
        dst.write(chunk)
        if digest is not None:
            digest.update(chunk)
        meter.release(len(chunk))
        length -= len(chunk)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer over its own storage (no copy), for file.write and hashlib."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def build_header(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Serialized header and the byte length of each tensor, for entries (name, dtype, shape) in file order."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def iter_entries(header: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in tensors_in_order(header):
        yield name, header[name]
