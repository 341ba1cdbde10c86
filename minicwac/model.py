"""A small decoder-only transformer with Llama-family blocks and Hugging Face parameter names.

Reads top to bottom in the order of the forward pass: RMSNorm -> RoPE -> attention -> MLP -> block -> model.
Every module is named exactly as in Hugging Face's LlamaForCausalLM (`model.layers.{i}.self_attn.q_proj`,
`model.layers.{i}.mlp.down_proj`, `model.norm`, `lm_head`, ...), so a state dict moves between the two by key
copy, and the CWAC code selects layers by these names on the toy model and on real checkpoints alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    """Model hyper-parameters; field names and meanings are those of Hugging Face's LlamaConfig."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict:
        """The config.json content (Hugging Face keys, plus `architectures`)."""
        return {"architectures": ["LlamaForCausalLM"], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a config.json dict, ignoring keys this model does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (as HF does) so bf16 checkpoints give the same numbers
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) in the Hugging Face layout: the frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF pairs dimension i with i + head_dim/2 (not adjacent dims as in the original RoPE paper)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B, T, hd) broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, **kw)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, **kw)

    def forward(self, x, cos, sin, mask, cache: "KVCache | None" = None, layer_idx: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: attend to the keys/values of all earlier tokens too
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, P+T, hd)
        # grouped-query attention: each group of n_head / n_kv query heads shares one k/v head
        gqa = self.n_kv != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, so generation feeds one new token per step."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r}, expected 'silu'")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` part of the state dict: embeddings, layers, final norm."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)


class GPT(nn.Module):
    """Decoder-only LM; `GPT(cfg)(input_ids)` returns logits (B, T, vocab_size)."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if device is None or torch.device(device).type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        std = self.config.initializer_range
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
        B, T = input_ids.shape
        L = self.config.num_hidden_layers
        if stop_at_layer is not None and not 0 <= stop_at_layer <= L:
            raise ValueError(f"stop_at_layer={stop_at_layer}, expected 0..{L}")
        P = len(cache) if cache is not None else 0  # tokens already in the cache
        dev = input_ids.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(P, P + T, device=dev).expand(B, T)
            else:  # count only real tokens, so a left-padded prompt starts at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = None
        if attention_mask is not None or P > 0:
            # query i (absolute position P + i) sees keys 0..P+i that are not padding
            causal = torch.ones(T, P + T, dtype=torch.bool, device=dev).tril(diagonal=P)
            keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, P + T, dtype=torch.bool,
                                                                                       device=dev)
            mask = causal & keep[:, None, None, :]  # (B, 1, T, P+T)
            # a padding query with no visible key would give NaN; let it see itself (its output is ignored)
            own = torch.arange(P + T, device=dev)[None, :] == torch.arange(P, P + T, device=dev)[:, None]  # (T, P+T)
            mask = mask | own
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if stop_at_layer is not None and i == stop_at_layer:
                return x
            x = layer(x, cos, sin, mask, cache, i)
        if stop_at_layer == L:
            return x
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue left-padded prompts (B, T); returns only the new tokens (B, <= max_new_tokens).

        temperature 0 is greedy; otherwise sample (optionally from the top_k) with the explicit `generator`,
        so a sample is reproducible. Rows that emitted `eos_token_id` are padded with it afterwards.
        """
        if max_new_tokens <= 0:
            return input_ids.new_empty((input_ids.shape[0], 0))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        am, cache = attention_mask, KVCache(self.config.num_hidden_layers)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, attention_mask=am, cache=cache)[:, -1, :].float()  # the prompt, once
        new = []
        for _ in range(max_new_tokens):
            if temperature == 0.0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            new.append(nxt)
            if eos_token_id is not None and bool(done.all()) or len(new) == max_new_tokens:
                break
            am = torch.cat([am, torch.ones_like(nxt[:, None])], dim=1)
            logits = self(nxt[:, None], attention_mask=am, cache=cache)[:, -1, :].float()  # (B, vocab)
        return torch.stack(new, dim=1)
