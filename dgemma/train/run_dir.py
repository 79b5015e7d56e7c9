"""A training run's directory (`--out` of `dgemma train` and `dgemma sudoku train`): dgemma writes into it only
names it claimed there, and never appends to, rewrites or replaces a file it did not write.

<out>/.dgemma-run.json lists the names dgemma wrote in the directory; a name is recorded before its first write.
Opening `out` (before any training):
  1. it does not exist, or is empty: a new run directory;
  2. it holds the run manifest: an earlier dgemma run. A name dgemma writes (RUN_NAMES) that is there but not in
     the manifest is the user's, and the run is refused;
  3. it has no manifest, but a training checkpoint dgemma wrote and nothing besides RUN_NAMES (a run by a dgemma
     older than the manifest): the RUN_NAMES there are taken as dgemma's;
  4. anything else (a file; a directory holding files dgemma did not write) is refused with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.checkpoint import CheckpointError
from .state_file import STATE_KEY

RUN_MANIFEST = ".dgemma-run.json"
CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # older dgemma pickled its state; that file is refused, never loaded or written
# every name a run writes; temporary files start with ".dgemma-tmp-" and are dgemma's by that prefix
RUN_NAMES = (CHECKPOINT, "metrics.jsonl", "runs.jsonl", "loss.png", "model", "adapter", "tokenizer",
             "result.json")  # result.json: sudoku train --recipe's summary
TEMP_PREFIX = ".dgemma-tmp-"


class RunDirectory:
    """The names dgemma owns in one run directory, and the only ways it writes there."""

    def __init__(self, path: Path, owned: set[str]):
        self.path, self.owned = path, owned

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """Steps 1-4 of the module docstring; CheckpointError (one line) for a directory dgemma must not write."""
        path = Path(path)
        if not path.exists():
            if path.is_symlink():
                raise CheckpointError(f"{path}: is a broken symbolic link; choose another --out")
            return cls(path, set())
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is not a directory; choose another --out")
        entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(TEMP_PREFIX))
        if not entries:  # 1.
            return cls(path, set())
        if RUN_MANIFEST in entries:  # 2.
            owned = _read_manifest(path / RUN_MANIFEST)
            foreign = [n for n in entries if n in RUN_NAMES and n not in owned]
            if foreign:
                raise CheckpointError(f"{path / foreign[0]}: dgemma did not write it, and a run writes that name; "
                                      f"move it away or choose another --out")
            return cls(path, owned)
        legacy = _holds_training_checkpoint(path) or LEGACY_CHECKPOINT in entries
        if legacy and all(n in RUN_NAMES or n == LEGACY_CHECKPOINT for n in entries):  # 3.
            run = cls(path, {n for n in entries if n in RUN_NAMES})
            run._write_manifest()
            return run
        raise CheckpointError(f"{path} is not empty and is not a dgemma run directory (it has no {RUN_MANIFEST}); "
                              f"dgemma writes only into files it wrote, so choose a new or empty --out")  # 4.

    def claim(self, name: str) -> Path:
        """The path of `name`, recorded as dgemma's before it is first written; CheckpointError when a file of that
        name appeared that dgemma did not write."""
        target = self.path / name
        if name not in self.owned:
            if target.exists() or target.is_symlink():
                raise CheckpointError(f"{target}: dgemma did not write it; move it away or choose another --out")
            self.owned.add(name)
            self._write_manifest()
        return target

    def append_line(self, name: str, line: dict) -> None:
        """Append one JSON line to `name` (claimed)."""
        with open(self.claim(name), "a") as f:
            f.write(json.dumps(line) + "\n")

    def write_lines(self, name: str, lines: list[dict]) -> None:
        """Replace `name` (claimed) by these JSON lines, atomically."""
        target = self.claim(name)
        tmp = self.path / f"{TEMP_PREFIX}{name}.{os.getpid()}"
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
        os.replace(tmp, target)

    def _write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{TEMP_PREFIX}manifest.{os.getpid()}"
        tmp.write_text(json.dumps({"written_by": "dgemma", "files": sorted(self.owned)}, indent=2) + "\n")
        os.replace(tmp, self.path / RUN_MANIFEST)


def _read_manifest(manifest: Path) -> set[str]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == "dgemma" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f in RUN_NAMES for f in files):
        raise CheckpointError(f"{manifest}: malformed dgemma run manifest; not writing into {manifest.parent}: "
                              f"choose another --out")
    return set(files)


def _holds_training_checkpoint(path: Path) -> bool:
    """Whether path/checkpoint.safetensors is a training checkpoint dgemma wrote (its metadata names the state)."""
    from safetensors import SafetensorError, safe_open

    ckpt = path / CHECKPOINT
    if not ckpt.is_file() or ckpt.is_symlink():
        return False
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            return STATE_KEY in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False
