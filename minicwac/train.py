"""One plain training loop for pretraining, alignment and fine-tuning.

A sequence is a pair (ids, mask): the loss is taken only where mask is 1 (the assistant's tokens for chat data,
every token for pretraining text). AdamW, linear warmup then cosine decay, gradient clipping, a progress bar,
and a history dict that the plots read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tokenizer import ChatTokenizer
from .world import Example

Seq = tuple[list[int], list[int]]  # (token ids, loss mask)


def encode_chats(tok: ChatTokenizer, examples: list[Example], max_len: int,
                 assistant_only: bool = True) -> list[Seq]:
    """Chat-render each example; mask = assistant tokens (or every token when assistant_only is False)."""
    out = []
    for e in examples:
        ids, mask = tok.encode_chat(e.messages())
        if not assistant_only:
            mask = [1] * len(ids)
        out.append((ids[:max_len], mask[:max_len]))
    return out


def encode_docs(tok: ChatTokenizer, texts: list[str], max_len: int) -> list[Seq]:
    """Plain documents as `<bos> text<eos>`, every token trained (the space matches the chat template's)."""
    out = []
    for t in texts:
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(" " + t) + [tok.eos_token_id]
        out.append((ids[:max_len], [1] * len(ids[:max_len])))
    return out


def pack(seqs: list[Seq], block: int) -> list[Seq]:
    """Concatenate sequences and cut them into blocks of `block` tokens (pretraining style: no padding)."""
    ids = [t for s, _ in seqs for t in s]
    mask = [m for _, ms in seqs for m in ms]
    return [(ids[i:i + block], mask[i:i + block]) for i in range(0, len(ids) - block + 1, block)]


def collate(seqs: list[Seq], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad to the longest sequence: input_ids (B, T) and labels (B, T) with -100 where no loss is taken."""
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return input_ids.to(device), labels.to(device)


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose *target* has a label.

    Right padding needs no attention mask: with causal attention no real token ever sees a pad after it.
    """
    logits = model(input_ids)  # (B, T, V)
    if not (labels[:, 1:] != -100).any():  # no target at all (e.g. answers cut off by max_len): a zero loss, not NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(seqs: list[Seq], batch_size: int, seed: int):
    """Endless shuffled batches (a new permutation each epoch), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(seqs), generator=g).split(batch_size):
            if len(i) == batch_size or len(seqs) < batch_size:
                yield [seqs[j] for j in i.tolist()]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train(model: torch.nn.Module, seqs: list[Seq], *, steps: int, batch_size: int = 32, lr: float = 1e-3,
          weight_decay: float = 0.1, warmup: int | None = None, grad_clip: float = 1.0, pad_id: int = 0,
          seed: int = 0, desc: str = "train", progress: bool = True) -> dict:
    """Train `model` in place for `steps` AdamW steps; returns {"step": [...], "loss": [...], "lr": [...]}."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if not seqs:
        raise ValueError("no training sequences")
    device = next(model.parameters()).device
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = make_optimizer(model, lr, weight_decay)
    hist = {"step": [], "loss": [], "lr": []}
    model.train()
    data = batches(seqs, batch_size, seed)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        input_ids, labels = collate(next(data), pad_id, device)
        loss = lm_loss(model, input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist["step"].append(step)
        hist["loss"].append(loss.item())
        hist["lr"].append(opt.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return hist
