"""Files that are never half-written: folders and JSON files land in one rename, or not at all."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(path: str | Path):
    """Yield a temporary folder beside `path`; on success it takes the place of `path`, on any error it is deleted
    and `path` is left as it was.

    Nothing is lost: a `path` that is a file is refused, and an existing folder is replaced only when every file
    in it is written again by this save (a folder holding anything else is refused, naming the file). Leftovers of
    an interrupted save beside `path` (`.NAME.tmp-*`, `.NAME.old`) are ours by name and are cleaned first."""
    path = Path(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} is a file; expected a folder (or no file of that name) to write into")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        for debris in path.parent.glob(f".{path.name}.tmp-*"):  # interrupted saves of this path: ours by name
            shutil.rmtree(debris, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        if path.is_dir():
            new = _files(tmp)
            lost = sorted(f for f in _files(path) if f not in new)
            if lost:
                raise FileExistsError(f"{path} holds {lost[0]} ({len(lost)} file(s) in all) that this save would "
                                      "not write again; refused so that nothing is lost (choose another folder)")
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir()}


def recover(path: str | Path) -> None:
    """Undo what an interrupted `replace_folder` can leave: `path` missing beside its `.NAME.old` (put back), or
    both there (the old one removed). Loaders call it, so the last complete folder is always what is read."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` in the place of `path`. Where the system can, the two are swapped in one
    step, so `path` always holds a complete folder; elsewhere the old one is renamed to `.NAME.old` first, and if
    the process dies between the two renames `recover` puts it back on the next load or save."""
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a checkpoint is meant to be shared
    for f in tmp.iterdir():
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    if path.exists() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = path.with_name(f".{path.name}.old")
    try:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)
        raise


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and check it is writable, before any long computation starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} is not writable ({e.strerror or e}); choose another with --out") from None
    return out


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it, so a crash never leaves a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a JSON file name to write")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=lambda x: None))
    tmp.replace(path)


def default_cache_dir() -> Path:
    """$MINICWAC_CACHE, else runs/cache in the source checkout (git-ignored), else ~/.cache/minicwac."""
    if os.environ.get("MINICWAC_CACHE"):
        return Path(os.environ["MINICWAC_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "runs" / "cache"
    return Path.home() / ".cache" / "minicwac"
