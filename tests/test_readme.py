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
