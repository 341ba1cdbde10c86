"""Exercise checks of notebook 02 (safety alignment).

`check_masked_loss`: the assistant-only next-token loss written by hand from logits and labels, against the
package's `data.lm_loss` on a small seeded model (random weights and batch, nothing from the notebook).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minicwac.core import data
from minicwac.io.config import Config
from minicwac.io.model import GPT


def _batch():
    """A tiny model and a right-padded batch: prompt (-100), answer (labelled), padding (-100) per row."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)).eval()
    seqs = []
    for n_prompt, n_answer in ((4, 3), (2, 6), (5, 1)):
        ids = torch.randint(3, 40, (n_prompt + n_answer,)).tolist()
        seqs.append((ids, [0] * n_prompt + [1] * n_answer))
    input_ids, labels = data.collate(seqs, pad_id=0)
    return model, input_ids, labels


def check_masked_loss(fn) -> None:
    """`fn(logits, labels)` (logits (B, T, V), labels (B, T) with -100 where no loss is taken) must return the
    mean cross-entropy over the positions t whose next token t+1 has a label, as `data.lm_loss` does."""
    model, input_ids, labels = _batch()
    with torch.no_grad():
        logits = model(input_ids)
        expected = data.lm_loss(model, input_ids, labels)
        got = fn(logits.clone(), labels.clone())
    assert isinstance(got, torch.Tensor) and got.dim() == 0, \
        f"expected a scalar tensor (the mean loss), got {getattr(got, 'shape', type(got))}"
    if torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
        # a label on a row's first token has no position before it to predict it: it must be ignored
        first = labels.clone()
        first[:, 0] = input_ids[:, 0]
        with torch.no_grad():
            again = fn(logits.clone(), first)
        torch.testing.assert_close(again, expected, msg=lambda m: "with a label on each row's first token the "
                                   f"loss changed ({m}): the first token has no earlier position to predict it "
                                   "from, so compare logits[:, :-1] with labels[:, 1:]")
        return
    lg, lb = logits.float(), labels
    keep = lb != -100
    no_shift = F.cross_entropy(lg[keep], lb[keep])
    shifted = F.cross_entropy(lg[:, :-1].flatten(0, 1), lb[:, 1:].flatten(), ignore_index=-100, reduction="none")
    per_row = torch.stack([shifted.view(lb.shape[0], -1)[b][lb[b, 1:] != -100].mean() for b in range(lb.shape[0])])
    hints = [
        (no_shift, "no shift: the logits at position t predict the token at t+1 (logits[:, :-1] against labels[:, 1:])"),
        (shifted.sum(), "the sum, not the mean over the labelled positions"),
        (per_row.mean(), "a mean per row, then over rows: lm_loss averages over all labelled positions at once "
                         "(a row with a long answer weighs more)"),
        (shifted.mean(), "the mean over every position, the -100 ones included: ignore them (ignore_index=-100)"),
    ]
    for value, hint in hints:
        if torch.allclose(got, value, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"your loss {got.item():.4f} differs from lm_loss {expected.item():.4f}: {hint}")
    torch.testing.assert_close(got, expected, msg=lambda m: f"your loss differs from lm_loss ({m}); check the shift "
                               "(t predicts t+1), the -100 positions and the mean over labelled targets")
