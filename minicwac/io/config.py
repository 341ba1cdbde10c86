"""config.json rules: a Hugging Face config.json of one of five model families read into `Config`, checked, and
written back.

`Config` holds the hyper-parameters under the names of Hugging Face's LlamaConfig, plus the few switches of the
other families: "llama" (the default and the toy model), "mistral", "qwen2", "gemma2" and "gpt2". What differs
between the families is listed once, in the tables below: `FAMILIES` (the architecture switches that the modules
of model.py read), `FAMILY_FIELDS` (the config.json keys each family reads and writes), `HF_DEFAULTS` (Hugging
Face's defaults for keys a checkpoint leaves out), `GPT2_CONFIG_KEYS` (GPT-2's own key names) and `ACTIVATIONS`
(the `hidden_act` spellings). Every field is checked before anything is built (`LIMITS`, `FIELD_RULES`): a
mistyped or hostile config.json is one line naming the field, its value and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


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
            # written twice (an old key beside the new one): both must say the same, else which one holds is a guess
            mpe = d.get("max_position_embeddings")
            if d.get("rope_scaling") is not None and _rope_scaling(d["rope_scaling"], mpe) != _rope_scaling(rope, mpe):
                raise ValueError(f"rope_scaling={d['rope_scaling']!r} disagrees with rope_parameters={rope!r}; "
                                 "expected one of them, or the same scaling in both")
            if "rope_theta" in d and "rope_theta" in rope and d["rope_theta"] != rope["rope_theta"]:
                raise ValueError(f"rope_theta={d['rope_theta']!r} disagrees with rope_parameters.rope_theta="
                                 f"{rope['rope_theta']!r}; expected the same value (or only one of them)")
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
