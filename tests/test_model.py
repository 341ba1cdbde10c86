"""The Llama-style model: shapes, causality, RoPE, GQA, padding, KV-cache generation, sampling, naming, dtypes."""
from __future__ import annotations

import math

import re

import pytest
import torch

from minicwac.io.config import Config
from minicwac.io.model import GPT, Attention, apply_rope, rope_cos_sin

from conftest import tiny_config


# --- independent reference implementations -----------------------------------------------------------------
def naive_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE in the rotate-half layout, via complex numbers: dim i pairs with i + d/2 as (real, imag) and is
    multiplied by exp(1j * position * theta^(-2i/d)). x: (..., T, d), positions: (..., T). Float64 math."""
    d = x.shape[-1]
    half = d // 2
    xd = x.double()
    z = torch.complex(xd[..., :half], xd[..., half:])
    inv_freq = torch.tensor([theta ** (-2 * i / d) for i in range(half)], dtype=torch.float64)
    angle = positions.double()[..., None] * inv_freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def naive_attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor, theta: float,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention written out: repeat each k/v head for its group of query heads, scores,
    explicit causal (and key padding) mask, softmax, weighted sum, output projection. Float64."""
    B, T, _ = x.shape
    nh, nkv, hd = attn.n_head, attn.n_kv, attn.hd
    xd = x.double()
    q = (xd @ attn.q_proj.weight.double().T).view(B, T, nh, hd).transpose(1, 2)
    k = (xd @ attn.k_proj.weight.double().T).view(B, T, nkv, hd).transpose(1, 2)
    v = (xd @ attn.v_proj.weight.double().T).view(B, T, nkv, hd).transpose(1, 2)
    pos = positions[:, None, :].expand(B, nh, T)
    q = naive_rope(q, pos, theta)
    k = naive_rope(k, pos[:, :nkv], theta)
    k = k.repeat_interleave(nh // nkv, dim=1)  # query head h uses kv head h // (nh / nkv)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, nh, T, T)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v  # (B, nh, T, hd)
    y = y.transpose(1, 2).reshape(B, T, nh * hd)
    return y @ attn.o_proj.weight.double().T


def greedy_recompute(model: GPT, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the full sequence at every step (no cache)."""
    out = ids
    for _ in range(n):
        nxt = model(out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1]:]


# --- tests ---------------------------------------------------------------------------------------------------
def test_output_shapes(make_model):
    """Logits are (B, T, vocab); the residual stream is (B, T, hidden)."""
    m = make_model()
    ids = torch.randint(0, 97, (3, 11))
    assert m(ids).shape == (3, 11, 97)
    assert m(ids, stop_at_layer=1).shape == (3, 11, 32)
    assert m(ids, attention_mask=torch.ones_like(ids)).shape == (3, 11, 97)


def test_explicit_head_dim_shapes(make_model):
    """head_dim may differ from hidden/heads (as in some HF configs); projections use it."""
    m = make_model(head_dim=12)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 12, 32)
    assert attn.k_proj.weight.shape == (2 * 12, 32)
    assert attn.o_proj.weight.shape == (32, 4 * 12)
    assert m(torch.randint(0, 97, (2, 5))).shape == (2, 5, 97)


@pytest.mark.parametrize("kw, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple"),
    (dict(head_dim=7), "must be even"),
    (dict(hidden_act="gelu"), "expected 'silu'"),
])
def test_config_rejects_invalid(kw, match):
    """Invalid head layouts and activations fail with a message naming the problem."""
    with pytest.raises(ValueError, match=match):
        GPT(tiny_config(**kw))


def test_config_dict_round_trip():
    """to_dict -> from_dict is the identity, and unknown config.json keys are ignored."""
    cfg = tiny_config(tie_word_embeddings=True, rope_theta=500.0)
    d = cfg.to_dict()
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert Config.from_dict({**d, "torch_dtype": "float32", "rope_scaling": None}) == cfg


@pytest.mark.parametrize("with_mask", [False, True])
def test_causality(make_model, with_mask):
    """Changing tokens at positions >= k never changes the logits at positions < k."""
    m = make_model(initializer_range=0.3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    k = 6
    changed = ids.clone()
    changed[:, k:] = torch.randint(0, 97, (2, 12 - k), generator=g)
    assert not torch.equal(changed[:, k:], ids[:, k:])
    kw = dict(attention_mask=torch.ones_like(ids)) if with_mask else {}
    a, b = m(ids, **kw), m(changed, **kw)
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, k:], b[:, k:], atol=1e-3)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_naive(theta):
    """rope_cos_sin + apply_rope equal the rotate-half RoPE (pair i with i + d/2, inv_freq = theta^(-2i/d)),
    including arbitrary (non-contiguous) positions."""
    hd = 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, hd, generator=g)  # (B, heads, T, hd)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 9, 10, 20, 21, 40, 63]])
    cos, sin = rope_cos_sin(positions, hd, theta, torch.float32)
    got = apply_rope(x, cos, sin)
    want = naive_rope(x, positions[:, None, :].expand(2, 3, 7), theta)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # position 0 is the identity; rotations preserve the norm of each (i, i + d/2) pair
    torch.testing.assert_close(got[0, :, 0], x[0, :, 0])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference."""
    hd = 8
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, 10000.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, 10000.0, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(dot(5, 2), dot(13, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 4), atol=1e-4)


@pytest.mark.parametrize("n_kv, head_dim", [(2, None), (1, None), (4, None), (2, 12)])
def test_gqa_attention_matches_naive(make_model, n_kv, head_dim):
    """One Attention module equals the naive repeat-kv causal attention (GQA, MQA, MHA, explicit head_dim)."""
    m = make_model(num_key_value_heads=n_kv, head_dim=head_dim, initializer_range=0.2)
    attn = m.model.layers[0].self_attn
    B, T = 2, 9
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(T).expand(B, T)
    cos, sin = rope_cos_sin(positions, attn.hd, m.config.rope_theta, torch.float32)
    with torch.no_grad():
        got = attn(x, cos, sin, None)  # is_causal path
        want = naive_attention(attn, x, positions, m.config.rope_theta)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        # explicit boolean mask path: causal, and row 0 may not attend to key 1
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[0, 1] = False
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
        got = attn(x, cos, sin, mask)
        want = naive_attention(attn, x, positions, m.config.rope_theta, key_mask=keep)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded(make_model):
    """A left-padded row gives the same logits at its real tokens as the row alone (positions restart at 0)."""
    m = make_model(initializer_range=0.3)
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(1, 97, (1, 8), generator=g), torch.randint(1, 97, (1, 5), generator=g)
    pad = 3
    ids = torch.full((2, 8), 0)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0], mask[0] = long[0], 1
    ids[1, pad:], mask[1, pad:] = short[0], 1
    with torch.no_grad():
        batch = m(ids, attention_mask=mask)
        torch.testing.assert_close(batch[0], m(long)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch[1, pad:], m(short)[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batch).all()  # padding queries do not produce NaN
        # the pad token's id does not matter
        ids2 = ids.clone()
        ids2[1, :pad] = 42
        torch.testing.assert_close(m(ids2, attention_mask=mask)[1, pad:], batch[1, pad:], atol=1e-6, rtol=0)


def test_left_padded_generation_matches_single_rows(make_model):
    """Batched greedy generation of left-padded prompts equals generating each prompt alone."""
    m = make_model(initializer_range=0.3)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batch = m.generate(ids, 10, attention_mask=mask)
    assert batch.shape == (3, 10)
    for i, r in enumerate(rows):
        assert batch[i].tolist() == m.generate(r[None], 10)[0].tolist()


def test_kv_cache_generate_equals_recompute(make_model):
    """KV-cached greedy `generate` produces the same tokens as re-running the whole sequence each step."""
    m = make_model(initializer_range=0.3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 6), generator=g)
    got = m.generate(ids, 15)
    want = greedy_recompute(m, ids, 15)
    assert got.tolist() == want.tolist()
    # the test is sensitive to context: changing only the first prompt token changes the continuation
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % 97
    assert m.generate(other, 15).tolist() != got.tolist()


def test_generate_stops_and_pads_after_eos(make_model):
    """A row that emitted eos continues with eos; generation stops once every row is done."""
    m = make_model(initializer_range=0.3)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    free = m.generate(ids, 12)
    eos = free[0, 3].item()
    first = free[0].tolist().index(eos)  # row 0 emits eos at step `first` (<= 3)
    out = m.generate(ids, 12, eos_token_id=eos)
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out[0, first:] == eos).all()
    row1 = free[1].tolist()
    stop1 = row1.index(eos) if eos in row1 else len(row1) - 1
    assert out[1, :stop1 + 1].tolist() == row1[:stop1 + 1]
    if eos in row1:  # both rows done -> stops early
        assert out.shape[1] == max(first, stop1) + 1
    else:
        assert out.shape[1] == 12
    single = m.generate(ids[:1], 12, eos_token_id=eos)
    assert single.shape == (1, first + 1) and single[0, -1].item() == eos


def test_sampling_reproducible_with_generator(make_model):
    """Sampling with the same torch.Generator seed repeats; other seeds give other samples; top_k=1 is greedy."""
    m = make_model(initializer_range=0.3)
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(7))

    def sample(seed, **kw):
        return m.generate(ids, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw).tolist()

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(3, top_k=5) == sample(3, top_k=5)
    assert sample(3, top_k=1) == m.generate(ids, 20).tolist()


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0, expected an integer >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(max_new_tokens=61), "more than the model's context of 64 positions"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature=-1.0, expected a finite number >= 0"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature=nan"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k=0, expected an integer >= 1"),
])
def test_generate_refuses_what_it_cannot_do(make_model, kw, match):
    """No tokens to make, a context the model has no positions for (4 + 61 > 64), a bad temperature or top_k:
    one line, before any forward."""
    m = make_model()
    ids = torch.randint(0, 97, (2, 4))
    with pytest.raises(ValueError, match=re.escape(match)):
        m.generate(ids, **kw)
    assert m.generate(ids, 60).shape[0] == 2  # 4 + 60 = 64 positions: allowed


def test_tied_embeddings_share_storage(make_model):
    """With tie_word_embeddings the head is the embedding matrix: one tensor, counted once."""
    tied, untied = make_model(tie_word_embeddings=True), make_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert tied.num_params() == untied.num_params() - 97 * 32
    with torch.no_grad():
        tied.model.embed_tokens.weight[5].fill_(1.0)
    assert torch.equal(tied.lm_head.weight[5], torch.ones(32))


def test_parameter_names_follow_hf_llama(make_model):
    """The state dict keys and shapes are exactly those of Hugging Face's LlamaForCausalLM."""
    m = make_model()
    sd = m.state_dict()
    want = {"model.embed_tokens.weight": (97, 32), "model.norm.weight": (32,), "lm_head.weight": (97, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        want.update({p + "self_attn.q_proj.weight": (32, 32), p + "self_attn.k_proj.weight": (16, 32),
                     p + "self_attn.v_proj.weight": (16, 32), p + "self_attn.o_proj.weight": (32, 32),
                     p + "mlp.gate_proj.weight": (64, 32), p + "mlp.up_proj.weight": (64, 32),
                     p + "mlp.down_proj.weight": (32, 64), p + "input_layernorm.weight": (32,),
                     p + "post_attention_layernorm.weight": (32,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert "model.layers.0.self_attn.q_proj.weight" in dict(m.named_parameters())
    assert "model.layers.0.mlp.down_proj.weight" in dict(m.named_parameters())


def test_bias_options_add_hf_bias_names(make_model):
    """attention_bias / mlp_bias add `.bias` tensors under the same HF names."""
    keys = make_model(attention_bias=True, mlp_bias=True).state_dict().keys()
    assert "model.layers.1.self_attn.q_proj.bias" in keys and "model.layers.1.mlp.down_proj.bias" in keys


@pytest.mark.parametrize("L", [0, 1, 2])
def test_stop_at_layer_returns_residual_stream(make_model, L):
    """stop_at_layer=L returns the output of layer L-1 (the embeddings for L=0), as a forward hook sees it."""
    m = make_model(initializer_range=0.3)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, so the masked path is exercised too
    seen = {}
    module = m.model.embed_tokens if L == 0 else m.model.layers[L - 1]
    h = module.register_forward_hook(lambda mod, inp, out: seen.__setitem__("out", out))
    try:
        with torch.no_grad():
            m(ids, attention_mask=mask)
    finally:
        h.remove()
    with torch.no_grad():
        got = m(ids, attention_mask=mask, stop_at_layer=L)
    assert got.shape == (2, 7, 32)
    torch.testing.assert_close(got, seen["out"], atol=1e-6, rtol=0)


def test_bfloat16_model(make_model):
    """dtype=torch.bfloat16 gives bf16 parameters, runs forward and generate, and approximates float32."""
    m16 = make_model(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(9))
    logits = m16(ids, attention_mask=torch.ones_like(ids))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert m16.generate(ids, 4).shape == (2, 4)
    m32 = make_model()
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    torch.testing.assert_close(logits.float(), m32(ids), atol=3e-2, rtol=5e-2)


def test_stop_at_layer_out_of_range_is_an_error():
    from minicwac.io.config import Config
    from minicwac.io.model import GPT
    m = GPT(Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="stop_at_layer=3, expected 0..2"):
        m(torch.zeros(1, 3, dtype=torch.long), stop_at_layer=3)


def test_gradient_checkpointing_same_loss_and_grads():
    """Recomputing the blocks in the backward pass changes memory, not the numbers."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(64, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generate_stops_on_any_of_several_eos():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(64, (3, 5))
    free = model.generate(ids, 12)
    stop = int(free[0, 3])  # row 0 emits this token at step 3: list it as a second end token
    out = model.generate(ids, 12, eos_token_id=[63 if stop != 63 else 62, stop])
    first = out[0].tolist().index(stop)
    assert first <= 3 and all(t == out[0, 0].new_tensor(63 if stop != 63 else 62) for t in out[0, first + 1:])
