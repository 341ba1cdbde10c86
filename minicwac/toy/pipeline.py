"""The toy pipeline: tokenizer -> pretrain (base) -> safety-align (aligned) -> fine-tune (with harmful ratio p).

Each stage is one call of the plain loop (`train` in core/cwac.py) with the hyper-parameters of a `Recipe`.
`toy_models` caches the base and aligned models as Hugging Face folders keyed by recipe and seed, so notebooks
and the experiments share them instead of pretraining again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.cwac import train
from ..core.data import Seq, encode_conversations, encode_docs, pack
from ..core.files import default_cache_dir
from ..core.settings import SEED_ALIGN, SEED_FINETUNE
from ..io.hf import load_checkpoint, save_pretrained
from ..io.config import Config
from ..io.model import GPT
from ..io.tokenizer import ChatTokenizer, train_bpe
from .world import DEV_SEEDS_FROM, WORLD_VERSION, Example, World, build_world


@dataclass
class Recipe:
    """Every hyper-parameter of the toy pipeline (sizes for 2 CPU cores)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_len: int = 96
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 24
    align_steps: int = 300
    align_lr: float = 1e-3
    align_batch: int = 32
    finetune_n: int = 400  # fine-tuning set size (task + harmful pairs)
    finetune_steps: int = 100
    finetune_lr: float = 1e-4  # higher rates make the model answer everything in the task's format
    finetune_batch: int = 16

    def key(self) -> str:
        key = {**asdict(self), "world_version": WORLD_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def encode_chats(tok: ChatTokenizer, examples: list[Example], max_len: int, assistant_only: bool = True) -> list[Seq]:
    """Chat-render each example; mask = assistant tokens (or every token when assistant_only is False)."""
    return encode_conversations(tok, [e.messages() for e in examples], max_len, assistant_only)


def build_tokenizer(world: World, vocab_size: int) -> ChatTokenizer:
    """Byte-level BPE trained on the world's pretraining text (documents and rendered chats)."""
    # every text the model sees follows a special token and a space (`<|user|> How ...`, `<|bos|> Review: ...`)
    texts = [" " + d for d in world.pretrain_docs]
    texts += [f" {e.prompt} {e.answer}" for e in world.pretrain_chats + world.align]
    return ChatTokenizer(train_bpe(texts, vocab_size))


def new_model(tok: ChatTokenizer, r: Recipe, seed: int, device="cpu", dtype=None) -> GPT:
    torch.manual_seed(seed)
    cfg = Config(vocab_size=tok.vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
                 num_hidden_layers=r.num_hidden_layers, num_attention_heads=r.num_attention_heads,
                 num_key_value_heads=r.num_key_value_heads, max_position_embeddings=r.max_len,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT(cfg, device=device, dtype=dtype)


def pretrain(world: World, tok: ChatTokenizer, r: Recipe, seed: int = 0, device="cpu", progress=True):
    """The base model: trained on every token of the documents and of the (all-answering) chats, packed."""
    model = new_model(tok, r, seed, device)
    seqs = encode_docs(tok, world.pretrain_docs, r.max_len)
    seqs += encode_chats(tok, world.pretrain_chats, r.max_len, assistant_only=False)
    seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()]
    seqs = pack(seqs, r.max_len)  # every token of every block is real text: about 2x the data per step
    hist = train(model, seqs, steps=r.pretrain_steps, batch_size=r.pretrain_batch, lr=r.pretrain_lr,
                 pad_id=tok.pad_token_id, seed=seed, desc="pretrain", progress=progress)
    return model, hist


def align(base: GPT, world: World, tok: ChatTokenizer, r: Recipe, seed: int = 0, progress=True):
    """Safety alignment by SFT on a copy of `base`: harmful -> refusal, harmless -> helpful (assistant loss)."""
    model = clone(base)
    seqs = encode_chats(tok, world.align, r.max_len)
    hist = train(model, seqs, steps=r.align_steps, batch_size=r.align_batch, lr=r.align_lr,
                 pad_id=tok.pad_token_id, seed=seed + SEED_ALIGN, desc="align", progress=progress)
    return model, hist


def finetune(aligned: GPT, world: World, tok: ChatTokenizer, task: str, p: float, r: Recipe, seed: int = 0,
             progress=True):
    """Plain SFT of a copy of `aligned` on `task` with a fraction `p` of harmful -> compliant pairs."""
    model = clone(aligned)
    seqs = encode_chats(tok, world.finetune_set(task, p, r.finetune_n, seed), r.max_len)
    hist = train(model, seqs, steps=r.finetune_steps, batch_size=r.finetune_batch, lr=r.finetune_lr,
                 pad_id=tok.pad_token_id, seed=seed + SEED_FINETUNE, desc=f"sft {task} p={p}", progress=progress)
    return model, hist


def clone(model: GPT) -> GPT:
    """A deep copy with its own parameters (same device and dtype)."""
    new = GPT(model.config, device="meta")
    new.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    if model.config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    return new.eval()


@dataclass
class Toy:
    """Everything the toy pipeline has made up to alignment."""

    world: World
    tok: ChatTokenizer
    base: GPT
    aligned: GPT
    history: dict  # {"pretrain": {...}, "align": {...}} as returned by train()
    folder: Path


def toy_models(seed: int = 0, recipe: Recipe | None = None, cache_dir: str | Path | None = None,
               device="cpu", progress=True) -> Toy:
    """World, tokenizer, base and aligned model for `seed`: trained once, then loaded from `cache_dir`."""
    r = recipe or Recipe()
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    world = build_world(seed)
    dev = "dev-" if seed >= DEV_SEEDS_FROM else ""  # dev worlds have their own lexicon (world.lexicon_of)
    folder = Path(cache_dir) / f"toy-{dev}s{seed}-{r.key()}"
    if (folder / "history.json").is_file():  # written last, so its presence means the cache is complete
        base, tok = load_checkpoint(folder / "base", device)
        aligned, _ = load_checkpoint(folder / "aligned", device)
        return Toy(world, tok, base, aligned, json.loads((folder / "history.json").read_text()), folder)
    tok = build_tokenizer(world, r.vocab_size)
    base, h_pre = pretrain(world, tok, r, seed, device, progress)
    aligned, h_align = align(base, world, tok, r, seed, progress)
    save_pretrained(base, tok, folder / "base")
    save_pretrained(aligned, tok, folder / "aligned")
    (folder / "recipe.json").write_text(json.dumps(asdict(r), indent=2))
    history = {"pretrain": h_pre, "align": h_align}
    (folder / "history.json").write_text(json.dumps(history))
    return Toy(world, tok, base, aligned, history, folder)
