"""A small decoder-only transformer with Hugging Face parameter names, covering five model families.

One model class, switched by `Config.model_type`: "llama" (the default and the toy model), "mistral", "qwen2",
"gemma2" and "gpt2". What differs between them is listed once, in the `FAMILIES` table of config.py (which also
reads and checks config.json), and each module reads its switch there. The file reads top to bottom in the order
of the forward pass: norms -> RoPE -> attention -> MLP -> block -> model.

Every family uses the same Llama-style module names (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`model.layers.{i}.mlp.down_proj`, `model.layers.{i}.input_layernorm`, `model.norm`, `lm_head`, ...), so the CWAC
code selects layers by one set of names on the toy model and on real checkpoints alike. For Llama, Mistral, Qwen2
and Gemma 2 these are Hugging Face's own names; GPT-2's names are translated on load and save (see hf.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ACTIVATIONS, FAMILIES, Config


# --- norms ---------------------------------------------------------------------------------------------------
# x / rms(x) * w: no mean taken out and no bias (every family but GPT-2)
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None, one_plus: bool = False):
        super().__init__()
        self.eps, self.one_plus = eps, one_plus
        # Gemma stores w - 1 (zeros are the identity); Llama stores w (ones are the identity)
        init = torch.zeros if one_plus else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (as HF does) so bf16 checkpoints give the same numbers
        xf = x.float()
        # (B, T, C): each token's vector scaled to rms 1
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:  # Gemma: scale by (1 + w) still in float32, then cast
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)  # Llama: cast first, then scale in the model's dtype


def make_norm(cfg: Config, device=None, dtype=None) -> nn.Module:
    norm = FAMILIES[cfg.model_type].norm
    if norm == "layer":  # GPT-2: mean-centred LayerNorm with a bias
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype, one_plus=norm == "rms_one_plus")


# --- rotary positions ----------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies theta^(-2i/d), with Llama 3's rescaling when `scaling` says llama3."""
    # (head_dim/2,): one frequency per pair of dimensions, from 1 down to nearly 1 / theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: wavelengths longer than original_max / low_freq_factor are stretched by `factor`, shorter than
    # original_max / high_freq_factor are kept, and the band between blends the two linearly in 1 / wavelength.
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the long-wavelength edge of the band, 1 at the short one
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(in_band, blended, stretched)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: dict | None = None):
    """cos, sin of shape (B, T, head_dim) in the Hugging Face layout: the frequencies repeated twice."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)  # (head_dim/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF pairs dimension i with i + head_dim/2 (not adjacent dims as in the original RoPE paper)
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat([-x2, x1], dim=-1)  # each (i, i + hd/2) pair turned by 90 degrees: (x1, x2) -> (-x2, x1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B, T, hd) broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # (B, nh, T, hd): each pair turned by its position's angle


# --- attention -----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        fam = FAMILIES[cfg.model_type]
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias if fam.qkv_bias is None else fam.qkv_bias  # Qwen2: q/k/v only
        o_bias = cfg.attention_bias if fam.o_bias is None else fam.o_bias
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=qkv_bias, **kw)
        # k and v: (C -> nkv*hd), fewer heads than q's nh under grouped-query attention
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=o_bias, **kw)
        self.rope = fam.rope
        # Gemma 2 scales scores by query_pre_attn_scalar ** -0.5 (None: SDPA's default 1 / sqrt(head_dim))
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, cache: "KVCache | None" = None, layer_idx: int = 0):
        B, T, _ = x.shape  # x: (B, T, C), already normalised
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.rope:  # GPT-2 added its positions to the embeddings instead
            # positions enter q and k only: the scores depend on the offset between tokens
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: attend to the keys/values of all earlier tokens too
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, P+T, hd)
        if self.softcap is not None:
            y = self._softcapped(q, k, v, mask)  # (B, nh, T, hd)
        else:
            # grouped-query attention: each group of n_head / n_kv query heads shares one k/v head
            gqa = self.n_kv != self.n_head
            # no mask: SDPA's own causal mask (its fast kernels); a mask: padding, a cache or a sliding window
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)  # (B, T, C)

    def _softcapped(self, q, k, v, mask):
        """Gemma 2's attention, written out: SDPA cannot squash the scores with cap * tanh(scores / cap)."""
        T, S = q.shape[2], k.shape[2]  # S = P + T keys when the cache holds P earlier tokens
        if mask is None:  # plain causal, nothing cached
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # query head h reads k/v head h // group size
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hd)
        scale = self.hd ** -0.5 if self.scale is None else self.scale
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, nh, T, S)
        scores = torch.tanh(scores / self.softcap) * self.softcap  # still (B, nh, T, S), now within (-softcap, softcap)
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, T, S) or (T, S), broadcast over the heads
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, nh, T, hd)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, so generation feeds one new token per step.

    Sliding-window layers keep every key too: the attention mask, not the cache, hides the old ones."""

    def __init__(self, num_layers: int):
        # per layer: (B, nkv, P, hd), None before the first forward
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            # appended along the time axis: (B, nkv, P + T, hd)
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


# --- MLP, block, model ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Gated (SwiGLU, GeGLU): down(act(gate(x)) * up(x)); GPT-2's plain MLP: down(act(up(x)))."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        fam = FAMILIES[cfg.model_type]
        # a family's fixed bias setting wins over config.mlp_bias (None: the config decides)
        kw = dict(bias=cfg.mlp_bias if fam.mlp_bias is None else fam.mlp_bias, device=device, dtype=dtype)
        if fam.gated_mlp:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        # (I -> C): CWAC's default weight target [paper]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.gated, self.act = fam.gated_mlp, ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) * (B, T, I) -> (B, T, C)
        return self.down_proj(self.act(self.up_proj(x)))  # (B, T, I) -> (B, T, C)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = make_norm(cfg, device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        # Llama, GPT-2: the norm before the MLP. Gemma 2: the norm of the attention output (same HF name)
        self.post_attention_layernorm = make_norm(cfg, device, dtype)
        self.sandwich = FAMILIES[cfg.model_type].sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(cfg, device, dtype)
            self.post_feedforward_layernorm = make_norm(cfg, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0):
        if self.sandwich:  # Gemma 2: x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                                                 layer_idx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        # pre-norm: each sublayer reads a normalised copy of x and adds its output to the residual stream
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


class Backbone(nn.Module):
    """The `model.` part of the state dict: embeddings, layers, final norm."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        if not FAMILIES[cfg.model_type].rope:  # GPT-2: one learned vector per position
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, device=device,
                                                dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, device, dtype)


def attention_masks(cfg: Config, attention_mask: torch.Tensor | None, B: int, T: int, P: int,
                    device) -> list[torch.Tensor | None]:
    """One boolean mask (B, 1, T, P+T) per layer, True where a query may attend; None means plain causal.

    Query i (absolute slot P + i) sees the keys 0..P+i that are not padding; in a sliding-window layer only the
    last `sliding_window` of them (slots P+i-W+1 .. P+i, as Hugging Face counts them)."""
    W = cfg.sliding_window
    # a window matters only when some layer slides and the keys outnumber the window
    windowed = W is not None and P + T > W and any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    full = None
    if attention_mask is not None or P > 0 or windowed:  # otherwise None: SDPA's causal fast path
        # query i (slot P + i) sees keys 0..P+i: a lower triangle shifted right by P
        causal = torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P)  # (T, P+T)
        # (B, P+T): False on padding keys
        keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, P + T, dtype=torch.bool,
                                                                                   device=device)
        full = causal & keep[:, None, None, :]  # (B, 1, T, P+T)
        # a padding query with no visible key would give NaN; let it see itself (its output is ignored)
        own = torch.arange(P + T, device=device)[None, :] == torch.arange(P, P + T, device=device)[:, None]
        full = full | own  # (B, 1, T, P+T)
    if not windowed:
        return [full] * cfg.num_hidden_layers
    too_old = torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P - W)  # slot <= P + i - W
    sliding = full & ~too_old  # (B, 1, T, P+T): causal, not padding, not too old
    return [sliding if cfg.is_sliding(i) else full for i in range(cfg.num_hidden_layers)]


def check_generation(cfg: Config, prompt_len: int, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None) -> None:
    """Refuse what generation cannot do, in one line: no token to generate, a context the model has no positions
    for, a temperature that is not a number >= 0, a top_k < 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}, expected an integer >= 1")
    if prompt_len < 1:
        raise ValueError("the prompt is empty; expected at least one token")
    if prompt_len + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} is more than the "
                         f"model's context of {cfg.max_position_embeddings} positions")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}, expected a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}, expected an integer >= 1 (or None)")


class GPT(nn.Module):
    """Decoder-only LM; `GPT(cfg)(input_ids)` returns logits (B, T, vocab_size)."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter: the logits read the embedding matrix
        # on the meta device there is no memory to draw into: the weights are loaded afterwards
        if device is None or torch.device(device).type != "meta":
            self.apply(self._init_weights)
        # recompute each block's activations in the backward pass instead of storing them (training only): about
        # a third more compute for a memory that no longer grows with the number of layers
        self.gradient_checkpointing = False

    def _init_weights(self, m: nn.Module):
        std = self.config.initializer_range
        # N(0, initializer_range) for matrices and embeddings, zero biases; a checkpoint overwrites them
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, stop_at_layer: int | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab). `attention_mask` is 1 for real tokens, 0 for padding (left or right); with a
        `cache` it covers the cached tokens too: (B, P + T).

        `stop_at_layer=L` runs only layers 0..L-1 and returns the residual stream after them (B, T, hidden):
        the activation constraint of CWAC needs nothing above its SAE layer.
        """
        cfg = self.config
        fam = FAMILIES[cfg.model_type]
        B, T = input_ids.shape  # input_ids: (B, T)
        L = cfg.num_hidden_layers
        if stop_at_layer is not None and not 0 <= stop_at_layer <= L:
            raise ValueError(f"stop_at_layer={stop_at_layer}, expected 0..{L}")
        P = len(cache) if cache is not None else 0  # tokens already in the cache
        dev = input_ids.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(P, P + T, device=dev).expand(B, T)  # (B, T): slots P .. P+T-1
            else:  # count only real tokens, so a left-padded prompt starts at position 0
                # (B, T): the new tokens' columns of the (B, P+T) mask
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        masks = attention_masks(cfg, attention_mask, B, T, P, dev)  # per layer: (B, 1, T, P+T) bool, or None
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if fam.scale_embeddings:  # Gemma: * sqrt(hidden_size), the factor rounded to the model's dtype as in HF
            x = x * torch.tensor(cfg.hidden_size ** 0.5).to(x.dtype)  # (B, T, C)
        if fam.rope:
            # (B, T, hd) each, computed once and shared by every layer
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        else:  # GPT-2: learned absolute positions
            cos = sin = None
            x = x + self.model.embed_positions(position_ids)  # (B, T, C) + (B, T, C)
        for i, layer in enumerate(self.model.layers):
            if stop_at_layer is not None and i == stop_at_layer:
                return x  # (B, T, C): the residual stream after stop_at_layer blocks
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, masks[i], cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[i], cache, i)  # (B, T, C)
        if stop_at_layer == L:
            return x  # after every block, before the final norm
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab)
        if cfg.final_logit_softcapping is not None:  # Gemma 2: squash into (-cap, cap)
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue left-padded prompts (B, T); returns only the new tokens (B, <= max_new_tokens).

        temperature 0 is greedy; otherwise sample (optionally from the top_k) with the explicit `generator`,
        so a sample is reproducible. `eos_token_id` may list several end tokens (Llama 3 chat models); rows that
        emitted one are padded with the first afterwards.
        """
        check_generation(self.config, input_ids.shape[-1], max_new_tokens, temperature, top_k)
        # (n_eos,): one or several end tokens
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).reshape(-1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        am, cache = attention_mask, KVCache(self.config.num_hidden_layers)  # am grows by one column per new token
        # (B,): rows that have emitted an end token
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, attention_mask=am, cache=cache)[:, -1, :].float()  # the prompt, once
        new = []
        for _ in range(max_new_tokens):
            if temperature == 0.0:
                nxt = logits.argmax(-1)  # (B,)
            else:
                logits = logits / temperature
                if top_k is not None:
                    # the k-th largest logit per row, (B, 1); everything below it is never sampled
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            if eos is not None:
                nxt = torch.where(done, eos[0], nxt)  # finished rows: padded with the first end token
                done = done | torch.isin(nxt, eos)
            new.append(nxt)
            # every row ended, or the last token drawn: no forward for logits nobody would read
            if eos is not None and bool(done.all()) or len(new) == max_new_tokens:
                break
            am = torch.cat([am, torch.ones_like(nxt[:, None])], dim=1)  # (B, P + 1): the new token is real
            logits = self(nxt[:, None], attention_mask=am, cache=cache)[:, -1, :].float()  # (B, vocab)
        return torch.stack(new, dim=1)  # (B, n_new)
