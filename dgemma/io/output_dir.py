"""The `--out` directory of `dgemma convert` / `dgemma quantize` (and the trainer's export): dgemma replaces only what
it wrote.

A directory dgemma writes holds MANIFEST, a list of the files it wrote there. Saving into `out`:
  1. `out` does not exist: write everything into a temporary directory beside it and rename that into place (atomic).
  2. `out` is empty, or a dgemma output (it has a MANIFEST): stage the new files in a temporary directory inside `out`
     (same file system), then move them in one rename each and remove the files of the previous output that the new
     one lacks. Files dgemma did not write (a README, an eval folder) stay. A new file whose name is taken by a file
     dgemma did not write is refused before anything moves.
  3. anything else (a file; a non-empty directory without a MANIFEST, such as `--out .` in a working directory) is
     refused with one line: dgemma never deletes what it did not write.
While step 2 moves files, the MANIFEST names the old and the new files, so a run killed there leaves a directory the
next save recognises and finishes cleaning; each file is replaced atomically, the set of files is not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .safetensors_file import CheckpointError

MANIFEST = ".dgemma-output.json"
STAGING_PREFIX = ".dgemma-staging-"  # inside an existing `out`; a leftover one (killed run) is ours to remove


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and Path(name).name == name
            and "/" not in name and "\\" not in name and "\x00" not in name)


def previous_output(out_dir: str | Path) -> list[str]:
    """The files an earlier save wrote into `out_dir` ([] for a new or empty directory); CheckpointError when
    `out_dir` is something dgemma must not replace. Cheap: call it before the expensive work."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        if out_dir.is_symlink():
            raise CheckpointError(f"{out_dir}: is a broken symbolic link; choose another --out")
        return []
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; choose another --out")
    entries = [p.name for p in out_dir.iterdir() if not p.name.startswith(STAGING_PREFIX)]
    if not entries:
        return []
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{out_dir} is not empty and is not a dgemma output (it has no {MANIFEST}); dgemma "
                              f"replaces only files it wrote, so choose a new or empty --out")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == "dgemma" else None
    if not isinstance(files, list) or not all(_plain_name(f) for f in files):
        raise CheckpointError(f"{manifest}: malformed dgemma manifest (files must be plain file names); not "
                              f"replacing {out_dir}: remove it yourself or choose another --out")
    return sorted(set(files))


def staging_dir(out_dir: Path) -> Path:
    """Where a save writes its files before they move into `out_dir` (steps 1 and 2), with the umask's permissions
    (mkdtemp makes it private; the saved model should not be)."""
    if out_dir.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _write_manifest(path: Path, files: list[str]) -> None:
    path.write_text(json.dumps({"written_by": "dgemma", "files": sorted(files)}, indent=2) + "\n")


def commit(tmp: Path, out_dir: Path, previous: list[str]) -> None:
    """Move the files staged in `tmp` into `out_dir` (steps 1 and 2 above); `tmp` is gone afterwards."""
    new = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
    umask = os.umask(0)
    os.umask(umask)
    _write_manifest(tmp / MANIFEST, new)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if not out_dir.is_dir():  # 1.
        os.replace(tmp, out_dir)
        return
    # 2. refuse before anything moves if a new name belongs to the user (or is a directory now)
    for name in new:
        target = out_dir / name
        if (target.exists() or target.is_symlink()) and (name not in previous or target.is_dir()):
            raise CheckpointError(f"{target}: would be overwritten, but dgemma did not write it; move it away or "
                                  f"choose another --out")
    union = tmp / ".manifest-union"
    _write_manifest(union, sorted(set(previous) | set(new)))
    os.chmod(union, 0o666 & ~umask)
    os.replace(union, out_dir / MANIFEST)
    for name in new:
        os.replace(tmp / name, out_dir / name)
    for name in sorted(set(previous) - set(new)):
        old = out_dir / name
        if old.is_symlink() or old.is_file():
            old.unlink()
    os.replace(tmp / MANIFEST, out_dir / MANIFEST)
    tmp.rmdir()
    for leftover in out_dir.glob(STAGING_PREFIX + "*"):  # from a killed save; only dgemma names them so
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
