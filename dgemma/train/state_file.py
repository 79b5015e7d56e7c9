"""The training checkpoint file: a state dict of tensors and plain data as one safetensors file, with no pickles.

The tensors are stored as safetensors tensors and everything else as JSON in the file's metadata, with a sha256 of
the whole state, checked on read. save_state writes a temporary file, reads it back and verifies it, then renames it
over the previous checkpoint, so a bad write never replaces a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ..io.checkpoint import CheckpointError
from ..errors import DgemmaError

STATE_KEY, CHECKSUM_KEY = "dgemma_train_state", "dgemma_train_sha256"


class TrainingError(DgemmaError, ValueError):
    """Training cannot go on (a non-finite loss, gradient or state); the message names the step or the tensor."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def state_checksum(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a saved state: its JSON structure, then each tensor's name, dtype, shape and bytes in name order."""
    h = hashlib.sha256(structure.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(state: dict, path: Path) -> None:
    """Write a state dict of tensors, numbers, strings, lists, tuples and dicts (any hashable JSON-able keys) as
    one safetensors file: tensors as tensors, the structure and its checksum as JSON metadata. Refuses NaN or Inf in
    a floating-point tensor. Writes a temporary file, reads it back and verifies it, then renames it over `path`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def pack(obj, where: str):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().clone().contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingError(f"not saving {path}: {where} holds NaN or Inf (the last good checkpoint is kept)")
            key = str(len(tensors))
            tensors[key] = t
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[pack(k, where), pack(v, f"{where}.{k}" if where else str(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot save a {type(obj).__name__} in a training checkpoint")

    structure = json.dumps(pack(state, ""))
    checksum = state_checksum(structure, tensors)
    tmp = path.with_name(f".dgemma-tmp-{path.name}.{os.getpid()}")  # run_dir.py's temporary-file prefix
    try:
        save_file(tensors, str(tmp), metadata={STATE_KEY: structure, CHECKSUM_KEY: checksum})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:  # read back: a write that does not verify must not replace the last good checkpoint
            load_state(tmp)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: the checkpoint just written does not read back intact, so the previous one "
                                  f"is kept (a disk or file system fault?): {e}") from None
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_state(path: Path) -> dict:
    """Read what save_state wrote, verifying its checksum."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if STATE_KEY not in metadata:
                raise CheckpointError(f"{path}: not a dgemma training checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({e})") from None
    structure = metadata[STATE_KEY]
    if CHECKSUM_KEY not in metadata:
        print(f"dgemma: {path} has no checksum (written by an older dgemma); resuming without verifying it",
              file=sys.stderr)
    elif state_checksum(structure, tensors) != metadata[CHECKSUM_KEY]:
        raise CheckpointError(f"{path}: checksum mismatch, the training checkpoint is corrupt")

    def unpack(obj):
        if isinstance(obj, list):
            return [unpack(v) for v in obj]
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__tuple__" in obj:
                return tuple(unpack(v) for v in obj["__tuple__"])
            return {unpack(k): unpack(v) for k, v in obj["__dict__"]}
        return obj

    try:
        return unpack(json.loads(structure))
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{path}: malformed training checkpoint state") from None
