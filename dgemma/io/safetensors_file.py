"""Reading safetensors files we did not write: the header parsed and checked field by field (a hostile value is one
line naming the file and tensor, never arithmetic on strings or an allocation it asks for), and tensors read through
a copy-on-write memory map, zero-copy when no conversion is needed."""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.checks import is_int
from ..errors import DgemmaError

DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(DgemmaError, ValueError):
    """A checkpoint dgemma cannot load. The message is one line naming the file and, where it applies, the tensor."""


@dataclass
class TensorRef:
    file: Path
    dtype: str
    shape: list[int]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass
class SafetensorsFile:
    """One safetensors file: its parsed header and a lazily created read-only-ish (copy-on-write) map."""

    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict = field(default_factory=dict)
    _mm: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
            except RecursionError:
                raise CheckpointError(f"{path}: not a safetensors file (header JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: not a safetensors file (__metadata__ is not an object)")
        tensors = {}
        data_start = 8 + n
        for name, info in header.items():
            ref = _tensor_ref(path, name, info, data_start, size)
            tensors[name] = ref
        _check_no_overlap(path, tensors)
        return cls(path, tensors, metadata)

    def map(self) -> mmap.mmap:
        """The file's copy-on-write memory map, created on first use."""
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, zero-copy when no conversion is needed."""
        ref = self.tensors[name]
        src_dtype = DTYPES[ref.dtype]
        mm = self.map()
        count = (ref.end - ref.begin) // src_dtype.itemsize
        if count == 0:
            return torch.empty(ref.shape, dtype=dtype or src_dtype)
        view = torch.frombuffer(mm, dtype=src_dtype, count=count, offset=ref.begin).view(ref.shape)
        if dtype is None or dtype == src_dtype:
            return view
        out = view.to(dtype)
        drop_pages(mm, ref.begin, ref.end)
        return out

    def raw(self, name: str) -> torch.Tensor:
        return self.get(name).clone()


def _tensor_ref(path: Path, name: str, info, data_start: int, size: int) -> TensorRef:
    """One header entry, checked field by field: a hostile value is one line, never arithmetic on strings."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{where}: malformed header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be two integers 0 <= begin <= end, got {offsets!r:.80}")
    begin, end = offsets
    numel = math.prod(shape)
    if end - begin != numel * DTYPES[dtype].itemsize:
        raise CheckpointError(f"{where}: byte range [{begin}, {end}) ({end - begin} bytes) does not match "
                              f"shape {shape} {dtype} ({numel * DTYPES[dtype].itemsize} bytes)")
    if data_start + end > size:
        raise CheckpointError(f"{where}: file is truncated (needs {data_start + end} bytes, has {size})")
    return TensorRef(path, dtype, shape, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorRef]) -> None:
    """Two tensors sharing bytes is never a valid safetensors file (and writing one would change the other)."""
    spans = sorted((ref.begin, ref.end, name) for name, ref in tensors.items() if ref.end > ref.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors {prev} and {name} overlap in the file")


def drop_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """Release mapped pages we have converted and no longer need (keeps peak RSS near the converted size)."""
    page = mmap.PAGESIZE
    start = (begin + page - 1) // page * page
    stop = end // page * page
    if stop > start and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
