"""The pieces every training loop here shares: sequences with a loss mask, batches, the LM loss, the schedule.

A sequence is a pair (ids, mask): the loss is taken only where mask is 1 (the assistant's tokens for chat data,
every token for pretraining text). AdamW with weight decay on matrices only, linear warmup then cosine decay.
The loop itself (pretraining, alignment and every fine-tuning method alike) is `cwac.finetune_cwac`.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .hooks import logits_of

Seq = tuple[list[int], list[int]]  # (token ids, loss mask)


def encode_conversations(tok, conversations: list[list[dict]], max_len: int | None,
                         assistant_only: bool = True) -> list[Seq]:
    """Render each conversation (a list of {"role", "content"} messages) with the tokenizer's chat template;
    mask = the assistant's tokens (every token when assistant_only is False). Cut at max_len (None: not cut)."""
    out = []
    for messages in conversations:
        ids, mask = tok.encode_chat(messages)  # mask: 1 on the assistant's tokens
        if not assistant_only:
            mask = [1] * len(ids)
        out.append((ids[:max_len], mask[:max_len]))
    return out


def encode_docs(tok, texts: list[str], max_len: int) -> list[Seq]:
    """Plain documents as `<bos> text<eos>`, every token trained (the space matches the chat template's)."""
    out = []
    for t in texts:
        # no BOS where the tokenizer has none
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(" " + t) + [tok.eos_token_id]
        # cut after EOS was added: a cut document ends without one
        out.append((ids[:max_len], [1] * len(ids[:max_len])))
    return out


def pack(seqs: list[Seq], block: int) -> list[Seq]:
    """Concatenate sequences and cut them into blocks of `block` tokens (pretraining style: no padding)."""
    ids = [t for s, _ in seqs for t in s]  # every sequence end to end: (total tokens,)
    mask = [m for _, ms in seqs for m in ms]
    # the tail shorter than `block` is dropped, so every block is full and none needs padding
    return [(ids[i:i + block], mask[i:i + block]) for i in range(0, len(ids) - block + 1, block)]


def collate(seqs: list[Seq], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad to the longest sequence: input_ids (B, T) and labels (B, T) with -100 where no loss is taken."""
    input_ids, _ = pad_right([ids for ids, _ in seqs], pad_id)  # (B, T)
    loss_mask, _ = pad_right([mask for _, mask in seqs], 0)  # padding is never a target
    labels = input_ids.masked_fill(loss_mask == 0, -100)  # (B, T): -100 is the ignore_index of F.cross_entropy below
    return input_ids.to(device), labels.to(device)


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
            n_targets: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose *target* has a label.

    n_targets: divide the summed loss by this count instead (the targets of the whole global batch when this is
    one rank's part of it: the ranks' gradients then sum to the global mean's). Right padding needs no attention
    mask: with causal attention no real token ever sees a pad after it.
    """
    logits = logits_of(model(input_ids))  # (B, T, V)
    if not (labels[:, 1:] != -100).any():  # no target at all (e.g. answers cut off by max_len): a zero loss, not NaN
        return logits.sum() * 0.0  # still attached to the graph: backward() runs as usual
    # position t predicts token t + 1: logits[:, :-1] (B*(T-1), V) against labels[:, 1:] (B*(T-1),);
    # float32 logits, so the log-softmax is exact enough under bf16 autocast
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                         reduction="mean" if n_targets is None else "sum")
    return ce if n_targets is None else ce / n_targets


def n_targets(seqs: list[Seq]) -> int:
    """The positions `lm_loss` takes a loss at: every masked token but a sequence's first (it has no context)."""
    return sum(sum(mask[1:]) for _, mask in seqs)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup  # step 0 already trains (lr / warmup); step warmup - 1 reaches lr
    t = (step - warmup) / max(1, steps - warmup)  # 0 -> 1 over the steps after the warmup
    # 0.5 (1 + cos(pi t)) falls from 1 to 0: lr down to min_ratio * lr at the last step
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(seqs: list[Seq], batch_size: int, seed: int):
    """Endless shuffled batches (a new permutation each epoch), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)  # its own generator: the order does not depend on torch's global seed
    while True:
        for i in torch.randperm(len(seqs), generator=g).split(batch_size):  # index chunks of one permutation
            # an epoch's short last chunk is dropped: every step sees batch_size sequences (unless the set is smaller)
            if len(i) == batch_size or len(seqs) < batch_size:
                yield [seqs[j] for j in i.tolist()]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    # weight matrices and embeddings (dim >= 2) decay; norm gains and biases (dim 1) do not
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # betas (0.9, 0.95) and decay on matrices only [ours] (docs/method.md#5-the-cwac-step-and-its-ablations)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def pad_right(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and a (B, T) 0/1 mask of real tokens. Right padding needs no attention mask under causal
    attention: no real token ever sees a pad."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)  # the real tokens first, the padding after them
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares (a chat template's fixed opening, e.g. a system line)."""
    n = min(map(len, seqs), default=0)  # a common prefix cannot outrun the shortest sequence
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def token_mask(ids: torch.Tensor, mask: torch.Tensor, skip_ids=(), skip_prefix: int = 0) -> torch.Tensor:
    """Boolean (B, T): real tokens that are not in `skip_ids` (BOS: its activations are outliers on real models)
    and not among the first `skip_prefix` positions (a prefix every prompt shares carries nothing about harm)."""
    keep = mask.bool()  # (B, T); a new tensor, so the caller's `mask` is not changed
    keep[:, :skip_prefix] = False
    for t in skip_ids:
        if t is not None:  # e.g. [tok.bos_token_id] on a tokenizer without BOS
            keep &= ids != t
    return keep


def prompt_batches(seqs: list[list[int]], pad_id: int, device=None, batch_size: int | None = None, skip_ids=(),
                   skip_prefix: int = 0):
    """The batch loop every read of a model's activations shares: for each run of `batch_size` sequences, in
    order, yield `ids` (B, T), right-padded on `device`, and `keep` (B, T) bool, the tokens that count (see
    `token_mask`). batch_size=None: every sequence in one batch."""
    batch_size = batch_size or max(len(seqs), 1)  # max(.., 1): range() needs a step >= 1, also for no sequences
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i:i + batch_size], pad_id, device)  # (B, T) each
        yield ids, token_mask(ids, mask, skip_ids, skip_prefix)


def mix_by_tokens(harmful: list[list[int]], generic: list[list[int]], harmful_frac: float,
                  seed: int) -> list[list[int]]:
    """Every harmful sequence plus shuffled generic ones until the harmful share of the tokens is
    about `harmful_frac`; the result shuffled (one seeded generator for both shuffles)."""
    rng = random.Random(seed)
    generic = list(generic)  # a copy: the caller's list is not shuffled
    rng.shuffle(generic)
    # the generic tokens needed for harmful / (harmful + generic) = harmful_frac
    want = sum(map(len, harmful)) * (1 - harmful_frac) / harmful_frac
    picked, n = [], 0
    for s in generic:  # whole sequences only: the generic tokens overshoot `want` by less than one sequence
        if n >= want:
            break
        picked.append(s)
        n += len(s)
    seqs = harmful + picked
    rng.shuffle(seqs)  # mixed, so that a held-out head of the list (the SAE's test tenth, `kit_sae`) holds both kinds
    return seqs
