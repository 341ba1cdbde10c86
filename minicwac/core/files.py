"""Files that are never half-written: folders and JSON files land in one rename, or not at all."""
from __future__ import annotations

import hashlib
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
    # a file (or a socket, a device) is never replaced by a folder
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} is a file; expected a folder (or no file of that name) to write into")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the parent must exist to hold the temporary folder
        recover(path)  # first undo a replace_folder that died half-way
        for debris in path.parent.glob(f".{path.name}.tmp-*"):  # interrupted saves of this path: ours by name
            shutil.rmtree(debris, ignore_errors=True)
        # beside `path`, on the same filesystem: a rename there is atomic (across filesystems it would be a copy)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OSError(f"cannot write {path}: {why_not(path, e)}") from None
    try:
        yield tmp
        # replacing a folder deletes its files: allowed only when this save writes every one of them again
        if path.is_dir():
            new = _files(tmp)  # relative paths, e.g. "subspace/cfg.json"
            lost = sorted(f for f in _files(path) if f not in new)
            if lost:
                raise FileExistsError(f"{path} holds {lost[0]} ({len(lost)} file(s) in all) that this save would "
                                      "not write again; refused so that nothing is lost (choose another folder)")
        replace_folder(tmp, path)  # the one step that makes the save visible
    except BaseException as e:  # also KeyboardInterrupt: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk or a lost mount while writing: one line naming the folder meant, not the temporary file (the
        # safetensors writer reports the same failures as its own error type)
        if (isinstance(e, OSError) and not isinstance(e, FileExistsError)) or type(e).__name__ == "SafetensorError":
            raise OSError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}; nothing was changed there") \
                from None
        raise


def _files(folder: Path) -> set[str]:
    # files only: an empty folder holds nothing to lose
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir()}


def recover(path: str | Path) -> None:
    """Undo what an interrupted `replace_folder` can leave: `path` missing beside its `.NAME.old` (put back), or
    both there (the old one removed). Loaders call it, so the last complete folder is always what is read."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")  # where replace_folder parks the previous folder
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # the new folder made it: the parked one is debris
        else:
            old.rename(path)  # died between the two renames: the parked folder is the last complete one


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):  # renameat2 is Linux's own
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into this process
        renameat2 = libc.renameat2  # missing in old C libraries (glibc before 2.28)
    except (OSError, AttributeError):
        return False
    # AT_FDCWD: paths relative to the working folder; RENAME_EXCHANGE: swap, both must exist
    at_fdcwd, rename_exchange = -100, 2
    # 0 on success; -1 (e.g. a filesystem without the exchange) falls back to two renames below
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` in the place of `path`. Where the system can, the two are swapped in one
    step, so `path` always holds a complete folder; elsewhere the old one is renamed to `.NAME.old` first, and if
    the process dies between the two renames `recover` puts it back on the next load or save."""
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a checkpoint is meant to be shared
    for f in tmp.iterdir():
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    if path.exists() and _exchange(tmp, path):  # one atomic swap where the system has it
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = path.with_name(f".{path.name}.old")  # the fallback: two renames, the old folder parked in between
    try:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # a folder parked by an earlier crash would make the rename fail
            path.rename(old)
        tmp.rename(path)  # a crash right before this line: `recover` puts `old` back
        shutil.rmtree(old, ignore_errors=True)  # the new folder is in place: the parked one goes
    except BaseException:
        if old.exists() and not path.exists():  # undo the first rename: `path` is never left missing
            old.rename(path)
        raise


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces (a model folder is hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_out(out: str | Path, outputs: tuple[str, ...] = ()) -> Path:
    """Create the output folder and check it is writable, before any long computation starts.

    outputs: the files this command writes, its record first. An existing folder must then be empty or hold a
    previous run of the same command (its record present, nothing but its outputs): no other file, a user's or a
    model folder's, is ever written over."""
    out = Path(out)
    if outputs and out.is_dir():
        found = {p.name for p in out.iterdir()}
        if found and (outputs[0] not in found or not found <= set(outputs)):
            other = sorted(found - set(outputs)) or sorted(found)
            raise FileExistsError(f"{out} already holds files this command did not write ({', '.join(other[:3])}"
                                  f"{', ...' if len(other) > 3 else ''}); choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the pid: processes writing into one folder do not share a probe name
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")  # mkdir succeeds on an existing read-only folder: only a write tells
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} is not writable ({why_not(out, e)}); choose another with --out") from None
    return out


def why_not(path: Path, e: OSError) -> str:
    """Why `path` could not be made: a file where a folder of its path should be (named), else the system's words
    (without the errno and the temporary name it may quote)."""
    for parent in [Path(path), *Path(path).parents]:
        if parent.exists():
            return f"{parent} is a file, not a folder" if not parent.is_dir() else (e.strerror or str(e))
    return e.strerror or str(e)


def read_json(path: str | Path, what: str = "a JSON object") -> dict:
    """A JSON object from `path`, or one line naming the file and what is wrong with it: missing, not UTF-8, not
    JSON (with its line and column), nested too deeply for Python's parser, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (or not a file); expected {what}")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text (byte {e.start}); expected {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected {what}") \
            from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply; expected {what}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}; expected {what}")
    return d


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it, so a crash never leaves a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a JSON file name to write")
    tmp = path.with_name(f".{path.name}.tmp")  # beside the target: replace() is then an atomic rename
    # allow_nan=False: NaN and inf are not JSON, refused rather than written; what JSON cannot hold becomes null
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=lambda x: None))
    tmp.replace(path)  # readers see the old file or the new one, never a part


def default_cache_dir() -> Path:
    """$MINICWAC_CACHE, else runs/cache in the source checkout (git-ignored), else ~/.cache/minicwac."""
    if os.environ.get("MINICWAC_CACHE"):
        return Path(os.environ["MINICWAC_CACHE"])
    repo = Path(__file__).resolve().parents[2]  # minicwac/core/files.py -> the checkout's root
    if (repo / "pyproject.toml").is_file():  # a source checkout, not an installed package
        return repo / "runs" / "cache"
    return Path.home() / ".cache" / "minicwac"
