"""Exercise checks of notebook 01 (a tiny GPT).

`check_attention`: causal grouped-query attention written by hand, against the package's `Attention` module on a
small seeded layer (random weights and inputs, nothing from the notebook).
"""
from __future__ import annotations

import torch

from minicwac.io.config import Config
from minicwac.io.model import Attention, apply_rope, rope_cos_sin


def _reference(q, k, v, *, kv_of_head, causal=True, scale=True):
    """Attention with one deliberate variation at a time: used to name the learner's likely mistake."""
    n_head, T, d = q.shape
    k, v = k[kv_of_head], v[kv_of_head]  # (n_head, T, d)
    scores = q @ k.transpose(-1, -2) / (d ** 0.5 if scale else 1.0)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def check_attention(fn) -> None:
    """`fn(q, k, v)` with q (n_head, T, d) and k, v (n_kv, T, d) must return the heads' outputs (n_head, T, d);
    mixed by o_proj they must give what the package's attention layer gives."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=32, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    attn = Attention(cfg).eval()
    nh, nkv, d, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 7
    x = torch.randn(1, T, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(T)[None], d, cfg.rope_theta, torch.float32)
    with torch.no_grad():
        q = apply_rope(attn.q_proj(x).view(1, T, nh, d).transpose(1, 2), cos, sin)[0]  # (nh, T, d)
        k = apply_rope(attn.k_proj(x).view(1, T, nkv, d).transpose(1, 2), cos, sin)[0]  # (nkv, T, d)
        v = attn.v_proj(x).view(1, T, nkv, d).transpose(1, 2)[0]
        expected = attn(x, cos, sin, None)[0]  # (T, C): the package's layer output
        y = fn(q.clone(), k.clone(), v.clone())
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (nh, T, d), \
        f"expected a tensor of shape (n_head, T, d) = {(nh, T, d)}, got {getattr(y, 'shape', type(y))}"
    with torch.no_grad():
        out = attn.o_proj(y.transpose(0, 1).reshape(T, nh * d))
    if torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
        return
    group = nh // nkv
    right = torch.arange(nh) // group
    hints = [
        (dict(kv_of_head=right, causal=False), "no causal mask: query i may only see keys j <= i (tril)"),
        (dict(kv_of_head=right, scale=False), "the scores are not scaled by 1 / sqrt(d)"),
        (dict(kv_of_head=torch.arange(nh) % nkv),
         f"query head h reads kv head h % n_kv; it should read h // (n_head / n_kv) = h // {group} "
         "(consecutive query heads share a kv head: repeat_interleave, not repeat)"),
    ]
    for kwargs, hint in hints:
        if torch.allclose(y, _reference(q, k, v, **kwargs), atol=1e-5, rtol=1e-4):
            raise AssertionError(f"your attention differs from the package's: {hint}")
    torch.testing.assert_close(out, expected, msg=lambda m: "your attention, mixed by o_proj, differs from the "
                               f"package's layer ({m}). Check the softmax axis (over the keys, the last dim), "
                               "the causal mask, the 1/sqrt(d) scale and which kv head each query head reads.")
