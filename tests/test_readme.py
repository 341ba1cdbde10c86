"""The Python snippets of the README ("On your own model") and of docs/checkpoints.md run as written, on a tiny
model saved where the snippet says "path/to/aligned-model"."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from minicwac.io.hf import save_pretrained
from minicwac.io.model import GPT

ROOT = Path(__file__).resolve().parents[1]


def snippet(path: Path, heading: str) -> str:
    text = path.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("path, heading", [(ROOT / "README.md", "## On your own model"),
                                           (ROOT / "docs" / "checkpoints.md", "## The method in a few lines")])
def test_snippet_runs(path, heading, tok, tmp_path, monkeypatch):
    code = snippet(path, heading)
    assert "path/to/aligned-model" in code and len(code.splitlines()) <= 25
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, max_position_embeddings=128))
    save_pretrained(model, tok, tmp_path / "aligned")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("path/to/aligned-model", str(tmp_path / "aligned")), str(path), "exec"), {})


def test_the_front_page_shows_the_way_in_first():
    """Under 20 KB; `make demo`, `make test` and the calibrate -> finetune commands come before the picture, and
    "On your own model" before the long results table."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 20_000
    first = text[:text.index("![")]
    for line in ("make demo", "make test", "python -m minicwac calibrate", "python -m minicwac finetune"):
        assert line in first, f"{line!r} should be on the README's first screen, above the picture"
    assert text.index("## On your own model") < text.index("## Headline result")


@pytest.mark.parametrize("name", ["README.md", "docs/results.md", "docs/method.md", "docs/performance.md"])
def test_every_table_of_the_docs_names_the_judge_of_its_hs(name):
    """A table that shows HS names the judge that made it (in its header row or its heading): every figure in the
    docs is the refusal matcher's."""
    from conftest import hs_tables_unnamed
    assert hs_tables_unnamed((ROOT / name).read_text(), "refusal matcher") == []
