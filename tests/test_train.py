"""The training loop: masked LM loss, collation, packing, lr schedule, batching and a short real run."""
from __future__ import annotations

import math

import pytest
import torch

from minicwac.io.model import GPT
from minicwac.core.cwac import train
from minicwac.core.data import batches, collate, encode_docs, lm_loss, lr_at, make_optimizer, pack
from minicwac.toy.pipeline import encode_chats

from conftest import tiny_config


class FixedLogits(torch.nn.Module):
    """A stub LM that returns the given logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits


def test_collate_right_pads_and_masks():
    seqs = [([5, 6, 7], [0, 1, 1]), ([8], [1])]
    ids, labels = collate(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_lm_loss_hand_computed():
    """Mean cross-entropy of logits[t] against token t+1, over targets that carry a label only."""
    g = torch.Generator().manual_seed(0)
    V = 7
    seqs = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 2, 3], [1, 0, 1])]
    ids, labels = collate(seqs, pad_id=0)
    logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    want, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1].item()
            if y != -100:
                lse = math.log(sum(math.exp(logits[b, t, v].item()) for v in range(V)))
                want += lse - logits[b, t, y].item()
                n += 1
    assert n == 4  # targets 3, 4, 5 of row 0 and 3 of row 1
    got = lm_loss(FixedLogits(logits), ids, labels)
    assert got.item() == pytest.approx(want / n, rel=1e-6)
    # logits at positions whose target has no label (and at the last position) do not matter
    changed = logits.clone()
    changed[0, 0] += 50.0  # predicts target 2 (unmasked)
    changed[0, 4] -= 50.0  # last position: no target
    changed[1, 0] += 9.0  # predicts target 2 (unmasked)
    changed[1, 2] *= 3.0  # predicts a padding target
    assert lm_loss(FixedLogits(changed), ids, labels).item() == pytest.approx(got.item(), rel=1e-12)
    # ...while a labelled target's logits do
    changed[0, 1] += torch.arange(V, dtype=torch.float64)
    assert lm_loss(FixedLogits(changed), ids, labels).item() != pytest.approx(got.item(), rel=1e-6)


def test_lm_loss_with_real_model_ignores_right_padding():
    """With causal attention, right padding never changes the loss of the real tokens."""
    torch.manual_seed(0)
    m = GPT(tiny_config(initializer_range=0.3)).eval()
    seq = ([3, 4, 5, 6], [0, 1, 1, 1])
    alone = lm_loss(m, *collate([seq], pad_id=0))
    padded = lm_loss(m, *collate([seq, ([9] * 9, [0] * 9)], pad_id=0))  # a fully unmasked longer row
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)


def test_pack_full_blocks():
    """pack concatenates and cuts into full blocks only; ids and masks stay aligned."""
    seqs = [([1, 2, 3], [1, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9, 10], [0, 0, 1, 1, 1]), ([11], [1])]
    blocks = pack(seqs, 4)
    assert blocks == [([1, 2, 3, 4], [1, 1, 1, 0]), ([5, 6, 7, 8], [1, 0, 0, 1])]
    assert all(len(i) == len(m) == 4 for i, m in blocks)
    assert pack(seqs, 11) == [(list(range(1, 12)), [1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1])]
    assert pack(seqs, 12) == []


@pytest.mark.parametrize("step, want", [
    (0, 0.1), (4, 0.5), (9, 1.0),  # linear warmup over 10 steps
    (10, 1.0),  # cosine starts at the peak
    (55, 0.1 + 0.9 * 0.5),  # half way through the decay
    (100, 0.1),  # ends at min_ratio * lr
])
def test_lr_schedule(step, want):
    assert lr_at(step, 100, 1.0, 10) == pytest.approx(want)


def test_lr_schedule_scales_and_decreases():
    assert lr_at(0, 50, 3e-3, 1) == pytest.approx(3e-3)
    lrs = [lr_at(s, 50, 3e-3, 5, min_ratio=0.0) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_batches_full_and_reproducible():
    """Endless full batches, each epoch a permutation, reproducible from the seed."""
    seqs = [([i], [1]) for i in range(10)]
    it = batches(seqs, 3, seed=0)
    first = [next(it) for _ in range(6)]
    assert all(len(b) == 3 for b in first)
    epoch = [s[0][0] for b in first[:3] for s in b]
    assert len(set(epoch)) == 9  # 3 full batches per epoch, the last partial one dropped
    it2 = batches(seqs, 3, seed=0)
    assert [next(it2) for _ in range(6)] == first
    it3 = batches(seqs, 3, seed=1)
    assert [next(it3) for _ in range(6)] != first
    small = batches(seqs[:2], 5, seed=0)  # fewer sequences than a batch: yield them all
    assert sorted(s[0][0] for s in next(small)) == [0, 1]


def test_encode_chats_and_docs(tok, world):
    """Chats keep the assistant mask (or all ones), truncated to max_len; docs are `<bos> text<eos>`."""
    ex = world.align[:5]
    full = encode_chats(tok, ex, max_len=1000)
    for e, (ids, mask) in zip(ex, full):
        assert (ids, mask) == tok.encode_chat(e.messages())
    short = encode_chats(tok, ex, max_len=8, assistant_only=False)
    assert all(len(i) == len(m) <= 8 and set(m) == {1} for i, m in short)
    docs = encode_docs(tok, ["Review: It was great. Verdict: positive."], max_len=100)
    ids, mask = docs[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and set(mask) == {1}
    assert tok.decode(ids) == " Review: It was great. Verdict: positive."
    assert len(encode_docs(tok, ["a long text " * 20], max_len=10)[0][0]) == 10


def test_optimizer_decays_matrices_only(tok):
    m = GPT(tiny_config())
    opt = make_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_train_rejects_bad_arguments():
    m = GPT(tiny_config())
    with pytest.raises(ValueError, match="must be >= 1"):
        train(m, [([1, 2], [1, 1])], steps=0)
    with pytest.raises(ValueError, match="no training sequences"):
        train(m, [], steps=5)


def test_short_training_lowers_loss(tok, world):
    """30 AdamW steps of a tiny model on a small chat set lower its assistant loss; history is recorded."""
    torch.manual_seed(0)
    m = GPT(tiny_config(vocab_size=tok.vocab_size))
    seqs = encode_chats(tok, world.align[:64], max_len=48)
    eval_ids, eval_labels = collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        before = lm_loss(m.eval(), eval_ids, eval_labels).item()
    hist = train(m, seqs, steps=30, batch_size=16, lr=3e-3, pad_id=tok.pad_token_id, progress=False)
    with torch.no_grad():
        after = lm_loss(m, eval_ids, eval_labels).item()
    assert not m.training
    assert hist["step"] == list(range(30)) and len(hist["loss"]) == len(hist["lr"]) == 30
    assert hist["lr"][0] == pytest.approx(lr_at(0, 30, 3e-3, 1)) and max(hist["lr"]) == pytest.approx(3e-3)
    assert before == pytest.approx(math.log(tok.vocab_size), abs=0.2)  # untrained: about uniform
    assert after < before - 1.0, (before, after)
    assert sum(hist["loss"][-5:]) < sum(hist["loss"][:5])


def test_training_is_reproducible(tok, world):
    """Same seed, same data -> identical losses and weights."""
    seqs = encode_chats(tok, world.align[:16], max_len=32)

    def run():
        torch.manual_seed(0)
        m = GPT(tiny_config(vocab_size=tok.vocab_size))
        return m, train(m, seqs, steps=4, batch_size=4, pad_id=tok.pad_token_id, seed=3, progress=False)

    (m1, h1), (m2, h2) = run(), run()
    assert h1["loss"] == h2["loss"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_lm_loss_without_targets_is_zero_not_nan():
    """A batch whose answers were all cut off has no target: the loss is 0 (with a gradient path), never NaN."""
    torch.manual_seed(0)
    m = GPT(tiny_config())
    ids = torch.randint(0, 97, (2, 6))
    loss = lm_loss(m, ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_optimizer_betas_are_the_documented_ones():
    """AdamW with betas (0.9, 0.95) [ours, docs/method.md]: a first step cannot tell them from torch's default."""
    opt = make_optimizer(GPT(tiny_config()), 1e-3, 0.1)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95)] * 2
