"""Checkpoints as Hugging Face folders: config.json, model.safetensors (or shards listed in
model.safetensors.index.json), tokenizer.json, tokenizer_config.json.

For Llama, Mistral, Qwen2 and Gemma 2 the model's modules carry Hugging Face's names, so loading and saving is a
key-for-key copy; GPT-2's names and layouts are translated by the one table `GPT2_NAMES` below. Every step is
guarded by checks that name the file and what is wrong. Nothing is ever pickled. Loading builds the model on
the meta device and assigns the checkpoint's tensors, so no second (float32) copy of the weights is ever made.
Writes go to a temporary folder that is renamed into place at the end, so an interrupted save never leaves a
half-written checkpoint.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.files import atomic_folder, read_json, recover
from .config import FAMILIES, Config
from .model import GPT
from .tokenizer import ChatTokenizer, load_tokenizer  # noqa: F401 -- load_tokenizer is part of this API

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)  # ("llama", "mistral", "qwen2", "gemma2", "gpt2")

# GPT-2 computes what our modules compute, under other names and in two other layouts: q, k and v are one fused
# `c_attn` (stacked along the output axis), and its Conv1D weights are stored (in, out), the transpose of
# nn.Linear's (out, in). One row per checkpoint tensor; {i} is the layer. How a tensor is converted on load
# (and back on save): "copy"; "t": transpose; "split": cut into q, k, v; "split_t": transpose, then cut.
GPT2_NAMES = [
    # Hugging Face GPT-2              minicwac                                               how
    ("wte.weight",                    "model.embed_tokens.weight",                           "copy"),
    ("wpe.weight",                    "model.embed_positions.weight",                        "copy"),
    ("h.{i}.ln_1.weight",             "model.layers.{i}.input_layernorm.weight",             "copy"),
    ("h.{i}.ln_1.bias",               "model.layers.{i}.input_layernorm.bias",               "copy"),
    ("h.{i}.attn.c_attn.weight",      "model.layers.{i}.self_attn.{q,k,v}_proj.weight",      "split_t"),
    ("h.{i}.attn.c_attn.bias",        "model.layers.{i}.self_attn.{q,k,v}_proj.bias",        "split"),
    ("h.{i}.attn.c_proj.weight",      "model.layers.{i}.self_attn.o_proj.weight",            "t"),
    ("h.{i}.attn.c_proj.bias",        "model.layers.{i}.self_attn.o_proj.bias",              "copy"),
    ("h.{i}.ln_2.weight",             "model.layers.{i}.post_attention_layernorm.weight",    "copy"),
    ("h.{i}.ln_2.bias",               "model.layers.{i}.post_attention_layernorm.bias",      "copy"),
    ("h.{i}.mlp.c_fc.weight",         "model.layers.{i}.mlp.up_proj.weight",                 "t"),
    ("h.{i}.mlp.c_fc.bias",           "model.layers.{i}.mlp.up_proj.bias",                   "copy"),
    ("h.{i}.mlp.c_proj.weight",       "model.layers.{i}.mlp.down_proj.weight",               "t"),
    ("h.{i}.mlp.c_proj.bias",         "model.layers.{i}.mlp.down_proj.bias",                 "copy"),
    ("ln_f.weight",                   "model.norm.weight",                                   "copy"),
    ("ln_f.bias",                     "model.norm.bias",                                     "copy"),
]
GPT2_PREFIX = "transformer."  # GPT2LMHeadModel's prefix; GPT2Model checkpoints (e.g. the original gpt2) have none

# Tensors a Hugging Face checkpoint may hold that are not parameters: skipped by name; any other tensor the
# model has no place for is an error.
IGNORED_TENSORS = re.compile(
    r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"  # RoPE frequencies saved by older transformers
    r"|(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")  # GPT-2's causal-mask buffers


def read_config(path: Path) -> Config:
    recover(path)  # a save killed between its two renames: the last complete folder is put back
    f = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; expected a folder with config.json and "
                                "model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; expected a Hugging Face model folder")
    d = read_json(f, "a JSON object (a model config)")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{f}: model_type {mt!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    try:
        return Config.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{f}: invalid config ({e})") from None


# --- checkpoint names <-> model names --------------------------------------------------------------------------
def _name_plan(model: GPT, prefix: str = "") -> list[tuple[str, list[str], str]]:
    """(checkpoint name, our parameter names, how) for every tensor the checkpoint must hold."""
    cfg = model.config
    ours = [k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if cfg.model_type != "gpt2":
        return [(k, [k], "copy") for k in ours]
    plan = []
    for hf, mine, how in GPT2_NAMES:
        for i in map(str, range(cfg.num_hidden_layers)) if "{i}" in hf else [""]:
            mine_i = mine.replace("{i}", i)
            names = [mine_i.replace("{q,k,v}", p) for p in "qkv"] if "{q,k,v}" in mine else [mine_i]
            plan.append((prefix + hf.replace("{i}", i), names, how))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    covered = sorted(n for _, names, _ in plan for n in names)
    assert covered == sorted(ours), "GPT2_NAMES does not cover the model's parameters"
    return plan


def _stored_shape(how: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The checkpoint's shape of a tensor, from our parameters' shapes."""
    if how == "copy":
        return shapes[0]
    if how == "t":
        return shapes[0][::-1]
    rows = sum(s[0] for s in shapes)  # q, k, v stacked along the output axis
    return (rows,) if how == "split" else (shapes[0][1], rows)


def _from_stored(t: torch.Tensor, how: str, sizes: list[int]) -> list[torch.Tensor]:
    """Checkpoint tensor -> our parameter(s); each a contiguous tensor of its own (safetensors refuses to save
    tensors that share memory)."""
    if how == "copy":
        return [t]
    if how == "t":
        return [t.t().contiguous()]
    t = t.t() if how == "split_t" else t
    return [p.clone(memory_format=torch.contiguous_format) for p in t.split(sizes, dim=0)]


def _to_stored(ts: list[torch.Tensor], how: str) -> torch.Tensor:
    """Our parameter(s) -> the checkpoint tensor (the inverse of _from_stored)."""
    if how == "copy":
        return ts[0]
    if how == "t":
        return ts[0].t()
    t = torch.cat(ts, dim=0)
    return t.t() if how == "split_t" else t


# --- reading the weight files ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> tuple[Path, list[Path]]:
    """(the file to name in errors, the safetensors files): model.safetensors, else the shards of the index."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return single, [single]
    if not index.is_file():
        raise FileNotFoundError(f"{single} is missing; expected the weights as model.safetensors or as shards "
                                f"listed in {index.name}")
    wm = read_json(index, "a JSON object (a safetensors index)").get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{index} has no weight_map; expected {{\"weight_map\": {{tensor name: shard file}}}}")
    root = path.resolve()
    for name in dict.fromkeys(wm.values()):
        if Path(name).is_absolute() or not (path / name).resolve().is_relative_to(root):
            raise ValueError(f"{index}: shard {name!r} is outside the model folder; expected a file name inside it")
    shards = [path / f for f in dict.fromkeys(wm.values())]  # unique, in order
    for f in shards:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; {index.name} lists it as a shard of the weights")
    return index, shards


FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Tensor name -> (file, shape, dtype) for every tensor in the files, from their headers (no data is read)."""
    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if k in found:
                        raise ValueError(f"{f}: tensor {k} is also in {found[k][0]}; expected each tensor once")
                    sl = h.get_slice(k)
                    found[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    return found


def weights_dtype(found: dict, names: list[str], dtype: torch.dtype | None) -> torch.dtype | None:
    """The rule for the loaded dtype: `dtype` if given; else the checkpoint's own when every weight has the same
    (16 or 32 bit) float dtype; else float32 (a mix, or float64), which holds every float16/bf16 value exactly."""
    kinds = {found[n][2] for n in names}
    bad = sorted(kinds - set(FLOAT_DTYPES))
    if bad:
        n = next(n for n in names if found[n][2] == bad[0])
        raise ValueError(f"{found[n][0]}: {n} is {bad[0]}; expected floating-point weights (F32, BF16, F16): "
                         "quantized checkpoints are not supported")
    if dtype is not None:
        return dtype
    if len(kinds) == 1 and kinds != {"F64"}:
        return None
    warnings.warn(f"the checkpoint mixes {', '.join(sorted(kinds))} weights: loaded as float32", stacklevel=3)
    return torch.float32


def check_finite(name: str, t: torch.Tensor, where, allow: bool) -> None:
    """Refuse (or with `allow`, warn about) a weight holding NaN or Inf: a model with one generates garbage."""
    # a NaN or Inf anywhere makes the sum non-finite: one pass, no weight-sized temporary for a clean weight (a
    # float16 sum can also overflow on finite values: then the values themselves are counted)
    if t.is_floating_point() and t.numel() and not math.isfinite(float(t.sum())):
        n = int((~torch.isfinite(t)).sum())
        if n == 0:
            return
        msg = f"{where}: {name} holds {n} NaN/Inf values"
        if not allow:
            raise ValueError(f"{msg}; refused (load with allow_nonfinite=True to read it anyway)")
        warnings.warn(msg, stacklevel=3)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, allow_nonfinite: bool = False) -> GPT:
    """Load a Hugging Face folder (llama, mistral, qwen2, gemma2 or gpt2) into the minicwac model, on `device`,
    in `dtype`, else the checkpoint's own (float32 if it mixes float dtypes). A weight holding NaN or Inf is
    refused unless allow_nonfinite (then a warning).

    The model is built on the meta device and the tensors are assigned, so no second (float32) copy of the
    weights is ever made. Every check (names, shapes) runs on the file headers before any weight is read.
    """
    model, files, found, plan = check_pretrained(path)
    cfg = model.config
    _check_device(device)
    dtype = weights_dtype(found, [hf for hf, _, _ in plan], dtype)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {}
    for f in files:  # one file open at a time
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                for hf, names, how in plan:
                    if found[hf][0] != f:
                        continue
                    t = h.get_tensor(hf)
                    check_finite(hf, t, f, allow_nonfinite)
                    t = t.to(dtype) if dtype is not None else t
                    sd.update(zip(names, _from_stored(t, how, [ours[n][0] for n in names])))
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True)
    if cfg.tie_word_embeddings:  # assign replaced the parameter objects: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def check_pretrained(path: str | Path) -> tuple[GPT, list[Path], dict, list]:
    """Every check of a Hugging Face folder that needs no weight: config, file names, tensor names and shapes
    (read from the safetensors headers). Returns the model on the meta device, the weight files, {checkpoint
    name: (file, shape)} and the name plan (checkpoint name, our names, how)."""
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = GPT(cfg, device="meta")
    src, files = _weight_files(path)
    found = _read_headers(files)
    gpt2_prefix = GPT2_PREFIX if cfg.model_type == "gpt2" and any(k.startswith(GPT2_PREFIX) for k in found) else ""
    plan = _name_plan(model, gpt2_prefix)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {hf: _stored_shape(how, [ours[n] for n in names]) for hf, names, how in plan}
    ignored = {k for k in found if IGNORED_TENSORS.fullmatch(k)}
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        ignored.add("lm_head.weight")  # a copy of the tied embedding some exporters store; HF ignores it too
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored)
    if missing:
        raise ValueError(f"{src}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{found[unexpected[0]][0]}: unexpected tensor {unexpected[0]} ({len(unexpected)} "
                         "unexpected in all)")
    for hf, shape in expected.items():
        if found[hf][1] != shape:
            raise ValueError(f"{found[hf][0]}: {hf} has shape {found[hf][1]}, expected {shape} from config.json")
    return model, files, found, plan


def save_pretrained(model: GPT, tokenizer: ChatTokenizer | None, path: str | Path) -> Path:
    """Write model (and tokenizer) as a Hugging Face folder at `path`, replacing it atomically if it exists.

    transformers' AutoModelForCausalLM loads the folder as the model's family (GPT-2 names mapped back)."""
    cfg = model.config
    with atomic_folder(path) as tmp:
        ours = {k: v.detach() for k, v in model.state_dict().items()}
        # HF convention: a tied head is not stored
        plan = _name_plan(model, GPT2_PREFIX if cfg.model_type == "gpt2" else "")
        sd = {hf: _to_stored([ours[n] for n in names], how).contiguous() for hf, names, how in plan}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(
            {**cfg.to_dict(), "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
            indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
             "pad_token_id": cfg.pad_token_id}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def _check_device(device) -> None:
    """A device this machine has, said in one line (not a CUDA traceback deep in the first copy)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}, but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}, but only {torch.cuda.device_count()} GPU(s) are visible")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    allow_nonfinite: bool = False) -> tuple[GPT, ChatTokenizer]:
    """Model and tokenizer from one folder (`load_pretrained`). A LoRA adapter folder (adapter_config.json, no
    config.json) is loaded onto its base model (the local folder its base_model_name_or_path names) and merged."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from ..core.lora import load_adapter, merge_lora
        base = read_json(path / "adapter_config.json", "a PEFT adapter config").get("base_model_name_or_path")
        if isinstance(base, str) and not Path(base).is_absolute() and (path / base / "config.json").is_file():
            base = str(path / base)  # a path relative to the adapter folder (or else to the current folder)
        if not isinstance(base, str) or not base or not (Path(base) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a LoRA adapter for {base!r}, which is not a local model folder; "
                                    "pass the base model's folder as base_model_name_or_path")
        model = load_pretrained(base, device, dtype, allow_nonfinite)
        load_adapter(model, path)
        tok_from = path if (path / "tokenizer.json").is_file() else Path(base)
        return merge_lora(model).eval(), check_vocab(model, load_tokenizer(tok_from), tok_from)
    model = load_pretrained(path, device, dtype, allow_nonfinite)
    return model, check_vocab(model, load_tokenizer(path), path)


def check_vocab(model, tok: ChatTokenizer, path: str | Path) -> ChatTokenizer:
    """Refuse a tokenizer with more tokens than the model has embedding rows: its ids past the end would fail
    deep inside a forward (an IndexError) in finetune, eval or drift-map. A larger vocabulary is fine (padded)."""
    rows = model.config.vocab_size
    if tok.vocab_size > rows:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary (config.json "
                         f"vocab_size) has {rows}; expected a tokenizer no larger than the model's vocabulary")
    return tok
