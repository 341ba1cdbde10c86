"""A small decoder-only transformer with Hugging Face parameter names, covering five model families.

One model class, switched by `Config.model_type`: "llama" (the default and the toy model), "mistral", "qwen2",
"gemma2" and "gpt2". What differs between them is listed once, in the `FAMILIES` table below, and each module
reads its switch there. The file reads top to bottom in the order of the forward pass: config -> norms -> RoPE
-> attention -> MLP -> block -> model.

Every family uses the same Llama-style module names (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`model.layers.{i}.mlp.down_proj`, `model.layers.{i}.input_layernorm`, `model.norm`, `lm_head`, ...), so the CWAC
code selects layers by one set of names on the toy model and on real checkpoints alike. For Llama, Mistral, Qwen2
and Gemma 2 these are Hugging Face's own names; GPT-2's names are translated on load and save (see hf.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Family:
    """The architecture switches of one Hugging Face model family (one `model_type`)."""

    architecture: str  # the HF class written to config.json "architectures"
    norm: str = "rms"  # "rms": w * x / rms(x); "rms_one_plus": (1 + w) * x / rms(x), all in float32 (Gemma);
    #                    "layer": LayerNorm with weight and bias (GPT-2)
    rope: bool = True  # rotary positions; False: learned absolute positions in model.embed_positions (GPT-2)
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2, no gate_proj)
    sandwich_norms: bool = False  # Gemma 2: normalise the attention and MLP outputs too, before each residual add
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    qkv_bias: bool | None = None  # biases on q/k/v_proj; None: config.attention_bias
    o_bias: bool | None = None  # bias on o_proj; None: config.attention_bias
    mlp_bias: bool | None = None  # biases on the MLP projections; None: config.mlp_bias


FAMILIES = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False),
    "gemma2": Family("Gemma2ForCausalLM", norm="rms_one_plus", sandwich_norms=True, scale_embeddings=True,
                     mlp_bias=False),
    "gpt2": Family("GPT2LMHeadModel", norm="layer", rope=False, gated_mlp=False, qkv_bias=True, o_bias=True,
                   mlp_bias=True),
}

# The switches beyond the common fields that each family reads, and writes to config.json. Every other switch
# must stay off (False / None), so that config.json says exactly what the model computes.
FAMILY_FIELDS = {
    "llama": ("attention_bias", "mlp_bias", "rope_scaling"),
    "mistral": ("rope_scaling", "sliding_window"),
    "qwen2": ("rope_scaling", "sliding_window", "layer_types"),
    "gemma2": ("attention_bias", "rope_scaling", "sliding_window", "layer_types", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping"),
    "gpt2": (),
}
SWITCHES = ("attention_bias", "mlp_bias", "rope_scaling", "sliding_window", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping")  # layer_types is derived where not read

# Hugging Face's defaults for config.json keys a checkpoint may leave out (from each family's configuration
# class; keys whose default equals ours, such as rope_theta=10000, are not repeated). Applied by Config.from_dict.
HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096,
                    tie_word_embeddings=False),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=32, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma2": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gpt2": dict(n_positions=1024, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                 tie_word_embeddings=True),
}

# GPT-2's config.json names for our fields (its own names win over ours when both are present)
GPT2_CONFIG_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                    "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
                    "layer_norm_epsilon": "rms_norm_eps", "activation_function": "hidden_act"}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation of GELU, written out as in the original code (F.gelu(approximate="tanh") equals
    # it up to rounding)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_new": gelu_new}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """The rope_scaling dict in one spelling: None (plain RoPE) or {"rope_type": "llama3", factor, ...}."""
    if scaling is None or scaling == {}:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r}, expected null or an object such as "
                         "{\"rope_type\": \"llama3\", \"factor\": 8.0, ...}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # older configs spell the key "type"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported; expected no rope_scaling or rope_type 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope_scaling is missing {missing[0]!r}")
    out = {"rope_type": "llama3", **{k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")},
           "original_max_position_embeddings": scaling.get("original_max_position_embeddings",
                                                           max_position_embeddings)}
    for k, v in out.items():
        if k != "rope_type":
            _check_field(f"rope_scaling.{k}", v, "pos_int" if k.startswith("original") else "pos_float")
    return {k: float(v) if k.endswith("factor") else v for k, v in out.items()}


# What each config field must be, checked before anything is built (`Config.__post_init__`, and `from_dict` for
# the fields it computes with). Upper bounds keep a hostile or mistyped config.json from allocating for minutes.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24, "max_window_layers": 1 << 20}
FIELD_RULES = {
    **{k: "pos_int" for k in LIMITS}, "head_dim": "pos_int?", "sliding_window": "pos_int?",
    "rms_norm_eps": "pos_float", "rope_theta": "pos_float", "initializer_range": "nonneg_float",
    "query_pre_attn_scalar": "pos_float?", "attn_logit_softcapping": "pos_float?",
    "final_logit_softcapping": "pos_float?", "tie_word_embeddings": "bool", "attention_bias": "bool",
    "mlp_bias": "bool", "bos_token_id": "token?", "eos_token_id": "token?", "pad_token_id": "token?",
    "hidden_act": "str", "model_type": "str",
}
_EXPECTED = {"pos_int": "a positive integer", "pos_float": "a finite number > 0", "nonneg_float": "a finite number >= 0",
             "bool": "true or false", "token": "a token id >= 0 (or a list of them)", "str": "a string"}


def _check_field(name: str, v, rule: str) -> None:
    """One line naming the field, its value and what was expected, if `v` breaks `rule` ("?" allows null)."""
    if rule.endswith("?"):
        if v is None:
            return
        rule = rule[:-1]
    if rule == "pos_int":
        ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= LIMITS.get(name.split(".")[-1], 1 << 31)
    elif rule in ("pos_float", "nonneg_float"):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            v > 0 if rule == "pos_float" else v >= 0)
    elif rule == "bool":
        ok = isinstance(v, bool)
    elif rule == "token":
        ids = v if isinstance(v, list) and v else [v]
        ok = all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    else:
        ok = isinstance(v, str)
    if not ok:
        limit = LIMITS.get(name.split(".")[-1])
        what = _EXPECTED[rule] + (f" <= {limit}" if rule == "pos_int" and limit else "")
        raise ValueError(f"{name}={v!r}, expected {what}")


@dataclass
class Config:
    """Model hyper-parameters; field names and meanings are those of Hugging Face's LlamaConfig, plus the few
    switches of the other families (each one read only by the families named in its comment)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-5  # the eps of every norm (GPT-2: its LayerNorms' layer_norm_epsilon)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama, gemma2: biases on q/k/v/o_proj (the other families fix them)
    mlp_bias: bool = False  # llama: biases on the MLP projections
    hidden_act: str = "silu"  # a key of ACTIVATIONS (Gemma 2's hidden_activation, GPT-2's activation_function)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    rope_scaling: dict | None = None  # RoPE families: None, or llama3 frequency scaling (factor, ...)
    sliding_window: int | None = None  # mistral, qwen2, gemma2: a "sliding_attention" layer sees this many keys
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None -> family default
    query_pre_attn_scalar: float | None = None  # gemma2: attention scores are scaled by this ** -0.5
    attn_logit_softcapping: float | None = None  # gemma2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # gemma2: logits -> cap * tanh(logits / cap)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type={self.model_type!r}, expected one of {tuple(FAMILIES)}")
        for name, rule in FIELD_RULES.items():
            if hasattr(self, name):
                _check_field(name, getattr(self, name), rule)
        fam = FAMILIES[self.model_type]
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                 f"{self.num_attention_heads} (give head_dim, or heads that divide it)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if fam.rope and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}, expected "
                             + ", ".join(repr(a) for a in ACTIVATIONS))
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        for k in SWITCHES:
            if k not in FAMILY_FIELDS[self.model_type] and getattr(self, k) not in (None, False):
                raise ValueError(f"{k}={getattr(self, k)!r} is not used by model_type {self.model_type!r}")
        if self.model_type == "gpt2" and (self.num_key_value_heads != self.num_attention_heads
                                          or self.head_dim * self.num_attention_heads != self.hidden_size):
            raise ValueError("gpt2 needs num_key_value_heads == num_attention_heads and head_dim == hidden_size / "
                             "num_attention_heads")
        if self.model_type == "gemma2" and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim  # the usual 1 / sqrt(head_dim), said explicitly
        if self.layer_types is None:
            if self.model_type == "gemma2":  # Gemma 2 alternates: layers 0, 2, 4, ... slide, 1, 3, 5, ... see all
                self.layer_types = [LAYER_TYPES[(i + 1) % 2] for i in range(self.num_hidden_layers)]
            else:  # Mistral: every layer slides when a window is set (Qwen2's pattern comes from its config.json)
                self.layer_types = [LAYER_TYPES[self.sliding_window is not None]] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must list {self.num_hidden_layers} of {LAYER_TYPES}, got "
                             f"{self.layer_types}")
        if "layer_types" not in FAMILY_FIELDS[self.model_type] and len(set(self.layer_types)) > 1:
            raise ValueError(f"{self.model_type} has one attention type for all layers; mixed layer_types need "
                             "qwen2 or gemma2")

    def is_sliding(self, i: int) -> bool:
        """Whether layer i attends only to the last `sliding_window` tokens."""
        return self.sliding_window is not None and self.layer_types[i] == "sliding_attention"

    def to_dict(self) -> dict:
        """The config.json content: this family's Hugging Face keys, plus `architectures`."""
        mt = self.model_type
        common = [f.name for f in fields(self) if f.name not in SWITCHES + ("layer_types",)]
        d = {"architectures": [FAMILIES[mt].architecture],
             **{k: getattr(self, k) for k in common + list(FAMILY_FIELDS[mt])}}
        if mt == "qwen2":  # Qwen2 switches its window on with use_sliding_window
            d["use_sliding_window"] = self.sliding_window is not None
            slides = [t == "sliding_attention" for t in self.layer_types]
            d["max_window_layers"] = slides.index(True) if any(slides) else self.num_hidden_layers
        elif mt == "gemma2":
            d["hidden_activation"] = d.pop("hidden_act")
        elif mt == "gpt2":  # GPT-2's own key names; the k/v heads, head_dim and rope_theta are implied
            for hf, ours in GPT2_CONFIG_KEYS.items():
                d[hf] = d.pop(ours)
            for k in ("num_key_value_heads", "head_dim", "rope_theta"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a config.json dict of any supported family (Hugging Face's defaults fill the keys it leaves
        out), ignoring keys this model does not use."""
        mt = d.get("model_type", "llama")
        d = {**HF_DEFAULTS.get(mt, {}), **d}
        hf_name = {ours: hf for hf, ours in GPT2_CONFIG_KEYS.items()} if mt == "gpt2" else {}
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(hf_name.get(k, k)) is None and hf_name.get(k) != "n_inner":  # GPT-2: n_inner null is 4 * n_embd
                raise ValueError(f"{hf_name.get(k, k)} is missing; a {mt} config.json needs it")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _check_field(hf_name.get(k, k), d.get(hf_name.get(k, k)), FIELD_RULES[k])  # used before the checks
        rope = d.get("rope_parameters")  # transformers >= 5 nests rope_theta and the scaling here
        if isinstance(rope, dict):
            if set(rope) & set(LAYER_TYPES):
                raise ValueError("rope_parameters per layer type are not supported; expected one set for all layers")
            d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            d["rope_scaling"] = rope
        if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor is not supported; expected RoPE on the whole head")
        if mt == "qwen2":
            if not d.get("use_sliding_window"):
                d["sliding_window"] = None
            if d.get("layer_types") is None:  # HF: the layers from max_window_layers on slide
                d["layer_types"] = [LAYER_TYPES[d["sliding_window"] is not None and i >= d["max_window_layers"]]
                                    for i in range(d["num_hidden_layers"])]
        elif mt == "gemma2":
            d["hidden_act"] = d["hidden_activation"]
            if d.get("use_bidirectional_attention"):
                raise ValueError("gemma2 with use_bidirectional_attention is not supported; expected a causal model")
        elif mt == "gpt2":
            for hf, ours in GPT2_CONFIG_KEYS.items():
                d[ours] = d[hf] if hf in d else d.get(ours)
            if d["intermediate_size"] is None:
                d["intermediate_size"] = 4 * d["hidden_size"]
            d["num_key_value_heads"], d["head_dim"] = d.get("num_attention_heads"), None
            for k, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
                if d.get(k, ok) != ok:
                    raise ValueError(f"gpt2 with {k}={d[k]} is not supported; expected {ok}")
        if d.get("num_key_value_heads") is None:  # HF: None means one k/v head per query head
            d["num_key_value_heads"] = d.get("num_attention_heads")
        if mt == "qwen2" and d.get("sliding_window") is not None:
            _check_field("max_window_layers", d.get("max_window_layers"), "pos_int")
        # read the common fields and this family's switches (as HF does, e.g. Mistral ignores layer_types)
        read = {f.name for f in fields(cls)} - set(SWITCHES) - {"layer_types"} | set(FAMILY_FIELDS.get(mt, ()))
        return cls(**{k: v for k, v in d.items() if k in read})


# --- norms ---------------------------------------------------------------------------------------------------
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
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)
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
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=o_bias, **kw)
        self.rope = fam.rope
        # Gemma 2 scales scores by query_pre_attn_scalar ** -0.5 (None: SDPA's default 1 / sqrt(head_dim))
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, cache: "KVCache | None" = None, layer_idx: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.rope:  # GPT-2 added its positions to the embeddings instead
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: attend to the keys/values of all earlier tokens too
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, P+T, hd)
        if self.softcap is not None:
            y = self._softcapped(q, k, v, mask)
        else:
            # grouped-query attention: each group of n_head / n_kv query heads shares one k/v head
            gqa = self.n_kv != self.n_head
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)

    def _softcapped(self, q, k, v, mask):
        """Gemma 2's attention, written out: SDPA cannot squash the scores with cap * tanh(scores / cap)."""
        T, S = q.shape[2], k.shape[2]
        if mask is None:  # plain causal, nothing cached
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # query head h reads k/v head h // group size
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        scale = self.hd ** -0.5 if self.scale is None else self.scale
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, nh, T, S)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, nh, T, hd)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, so generation feeds one new token per step.

    Sliding-window layers keep every key too: the attention mask, not the cache, hides the old ones."""

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


# --- MLP, block, model ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Gated (SwiGLU, GeGLU): down(act(gate(x)) * up(x)); GPT-2's plain MLP: down(act(up(x)))."""

    def __init__(self, cfg: Config, device=None, dtype=None):
        super().__init__()
        fam = FAMILIES[cfg.model_type]
        kw = dict(bias=cfg.mlp_bias if fam.mlp_bias is None else fam.mlp_bias, device=device, dtype=dtype)
        if fam.gated_mlp:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.gated, self.act = fam.gated_mlp, ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


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
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


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
    windowed = W is not None and P + T > W and any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    full = None
    if attention_mask is not None or P > 0 or windowed:
        causal = torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P)
        keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, P + T, dtype=torch.bool,
                                                                                   device=device)
        full = causal & keep[:, None, None, :]  # (B, 1, T, P+T)
        # a padding query with no visible key would give NaN; let it see itself (its output is ignored)
        own = torch.arange(P + T, device=device)[None, :] == torch.arange(P, P + T, device=device)[:, None]
        full = full | own
    if not windowed:
        return [full] * cfg.num_hidden_layers
    too_old = torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P - W)  # slot <= P + i - W
    sliding = full & ~too_old
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
            self.lm_head.weight = self.model.embed_tokens.weight
        if device is None or torch.device(device).type != "meta":
            self.apply(self._init_weights)
        # recompute each block's activations in the backward pass instead of storing them (training only): about
        # a third more compute for a memory that no longer grows with the number of layers
        self.gradient_checkpointing = False

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
        cfg = self.config
        fam = FAMILIES[cfg.model_type]
        B, T = input_ids.shape
        L = cfg.num_hidden_layers
        if stop_at_layer is not None and not 0 <= stop_at_layer <= L:
            raise ValueError(f"stop_at_layer={stop_at_layer}, expected 0..{L}")
        P = len(cache) if cache is not None else 0  # tokens already in the cache
        dev = input_ids.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(P, P + T, device=dev).expand(B, T)
            else:  # count only real tokens, so a left-padded prompt starts at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        masks = attention_masks(cfg, attention_mask, B, T, P, dev)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if fam.scale_embeddings:  # Gemma: * sqrt(hidden_size), the factor rounded to the model's dtype as in HF
            x = x * torch.tensor(cfg.hidden_size ** 0.5).to(x.dtype)
        if fam.rope:
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        else:  # GPT-2: learned absolute positions
            cos = sin = None
            x = x + self.model.embed_positions(position_ids)
        for i, layer in enumerate(self.model.layers):
            if stop_at_layer is not None and i == stop_at_layer:
                return x
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, masks[i], cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[i], cache, i)
        if stop_at_layer == L:
            return x
        logits = self.lm_head(self.model.norm(x))
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
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=input_ids.device).reshape(-1)
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
            if eos is not None:
                nxt = torch.where(done, eos[0], nxt)
                done = done | torch.isin(nxt, eos)
            new.append(nxt)
            if eos is not None and bool(done.all()) or len(new) == max_new_tokens:
                break
            am = torch.cat([am, torch.ones_like(nxt[:, None])], dim=1)
            logits = self(nxt[:, None], attention_mask=am, cache=cache)[:, -1, :].float()  # (B, vocab)
        return torch.stack(new, dim=1)
