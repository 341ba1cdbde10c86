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
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old one is removed only after
    the new one is in place), on any error it is deleted and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` in the place of `path` (an old one is removed only after the new one is in
    place; interrupted between the two renames, the old one is put back)."""
    old = path.with_name(f".{path.name}.old")
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a checkpoint is meant to be shared
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
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
