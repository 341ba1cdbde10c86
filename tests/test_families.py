"""The five model families against transformers, their own implementation: logits, padding, generation,
stop_at_layer, both directions of the checkpoint round trip, sharded bf16 loading without a float32 copy, and
the loader's errors.

Each family is a tiny random transformers model (eager attention, float32, weights perturbed so biases and norm
weights are not their trivial init). Gemma 2 gets soft-caps small enough to bite and a sliding window shorter
than the test sequence; Mistral a short window too; one Llama config uses llama3 RoPE scaling.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip(
    "transformers", reason="the family parity tests compare against transformers (a test-only dependency)")

from minicwac.io.hf import load_pretrained, save_pretrained  # noqa: E402
from minicwac.io.config import Config  # noqa: E402
from minicwac.io.model import GPT  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, T_PROMPT, N_NEW = 128, 12, 20
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, initializer_range=0.15)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # wavelengths < 16 kept, > 64 stretched, between blended
FAMILIES = {  # name -> (model_type, transformers config keys)
    "llama": ("llama", BASE),
    "llama3": ("llama", {**BASE, "rope_scaling": LLAMA3}),
    "mistral": ("mistral", {**BASE, "sliding_window": 5}),
    "qwen2": ("qwen2", BASE),
    "qwen2_window": ("qwen2", {**BASE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "gemma2": ("gemma2", {**BASE, "num_hidden_layers": 3, "head_dim": 24, "query_pre_attn_scalar": 20,
                          "attn_logit_softcapping": 1.0, "final_logit_softcapping": 4.0, "sliding_window": 4}),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                          eos_token_id=None, initializer_range=0.15)),
}


def hf_model(model_type: str, seed: int = 0, dtype=torch.float32, **kw):
    """A seeded random transformers model whose every parameter (biases and norm weights too) is perturbed."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(kw))  # it edits rope dicts in place
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(name, transformers model, the same weights loaded by minicwac from the transformers save)."""
    mt, kw = FAMILIES[request.param]
    hf = hf_model(mt, **kw)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_pretrained(path)


def batch():
    """Two prompts of T_PROMPT tokens, the second left-padded by 3; position ids counting real tokens only."""
    ids = torch.randint(0, VOCAB, (2, T_PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# --- parity with transformers ----------------------------------------------------------------------------------
@torch.no_grad()
def test_logits_match_transformers(pair):
    """Same logits (<= 1e-4) on a batch, and with left padding at the real tokens."""
    name, hf, ours = pair
    assert ours.config.model_type == FAMILIES[name][0]
    ids, mask, pos = batch()
    assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    diff = hf(ids, attention_mask=mask, position_ids=pos).logits - ours(ids, attention_mask=mask)
    assert diff[mask.bool()].abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    """20 greedy tokens with a KV cache and a left-padded row are those of transformers' generate."""
    _, hf, ours = pair
    ids, mask, _ = batch()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    assert ours.generate(ids, N_NEW, attention_mask=mask).tolist() == want[:, T_PROMPT:].tolist()


@torch.no_grad()
def test_stop_at_layer_matches_transformers_hidden_states(pair):
    """stop_at_layer=L is transformers' hidden_states[L] (the residual stream entering layer L)."""
    _, hf, ours = pair
    ids, mask, pos = batch()
    hs = hf(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    for L in range(ours.config.num_hidden_layers):
        got = ours(ids, attention_mask=mask, stop_at_layer=L)
        assert (hs[L] - got)[mask.bool()].abs().max() <= 1e-4, L


@torch.no_grad()
def test_minicwac_save_loads_in_transformers(pair, tmp_path):
    """minicwac's save_pretrained -> transformers' AutoModelForCausalLM: the family's class, the same logits."""
    name, hf, ours = pair
    path = save_pretrained(ours, None, tmp_path / "ckpt")
    back = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    ids, mask, pos = batch()
    assert (back(ids).logits - ours(ids)).abs().max() <= 1e-4
    diff = back(ids, attention_mask=mask, position_ids=pos).logits - ours(ids, attention_mask=mask)
    assert diff[mask.bool()].abs().max() <= 1e-4
    assert load_pretrained(path).config == ours.config  # and minicwac reads its own save back unchanged


def test_every_family_uses_the_llama_module_names(pair):
    """The CWAC layer patterns match on every family; only gated MLPs have gate_proj; GPT-2 keeps its learned
    positions in model.embed_positions."""
    name, _, ours = pair
    names = [n for n, _ in ours.named_modules()]
    L = ours.config.num_hidden_layers
    assert len([n for n in names if re.fullmatch(r"model\.layers\.\d+\.mlp\.down_proj", n)]) == L
    for proj in "qkvo":
        assert f"model.layers.{L - 1}.self_attn.{proj}_proj" in names
    assert {"model.embed_tokens", "model.norm", "lm_head", "model.layers.0.input_layernorm"} <= set(names)
    assert ("model.layers.0.mlp.gate_proj" in names) == (name != "gpt2")
    assert ("model.embed_positions" in names) == (name == "gpt2")


@pytest.mark.parametrize("name, change", [
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=None)),
    ("qwen2_window", dict(sliding_window=None)),
    ("llama3", dict(rope_scaling=None)),
])
@torch.no_grad()
def test_family_switches_are_exercised(name, change, tmp_path):
    """The parity tests would fail without each switch: turning it off changes the logits."""
    mt, kw = FAMILIES[name]
    hf_model(mt, **kw).save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    off = GPT(dataclasses.replace(ours.config, **change)).eval()
    off.load_state_dict(ours.state_dict())
    ids, _, _ = batch()
    assert (ours(ids) - off(ids)).abs().max() > 1e-2
    if "final_logit_softcapping" in change:  # the caps really bite: uncapped logits go beyond the cap
        assert off(ids).abs().max() > ours.config.final_logit_softcapping


# --- config.json conventions -----------------------------------------------------------------------------------
def test_config_dict_round_trip_per_family():
    """to_dict writes each family's own keys and from_dict reads them back to the same Config."""
    cfgs = [Config(**{**dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=kv), **kw})
            for kv, kw in [(2, dict(rope_scaling=LLAMA3)), (2, dict(model_type="mistral", sliding_window=3)),
                           (2, dict(model_type="qwen2", sliding_window=3,
                                    layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2)),
                           (1, dict(model_type="gemma2", sliding_window=3, head_dim=16, final_logit_softcapping=5.0,
                                    attn_logit_softcapping=2.0, tie_word_embeddings=True,
                                    hidden_act="gelu_pytorch_tanh")),
                           (4, dict(model_type="gpt2", hidden_act="gelu_new", tie_word_embeddings=True))]]
    for cfg in cfgs:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert Config.from_dict(d) == cfg, cfg.model_type
    gpt2 = cfgs[-1].to_dict()
    assert gpt2["architectures"] == ["GPT2LMHeadModel"] and gpt2["n_embd"] == 32 and "hidden_size" not in gpt2
    qwen = cfgs[2].to_dict()
    assert qwen["use_sliding_window"] is True and qwen["max_window_layers"] == 2
    assert cfgs[3].to_dict()["hidden_activation"] == "gelu_pytorch_tanh"


def test_from_dict_applies_transformers_defaults():
    """Keys a config.json leaves out take the family's transformers default, not ours."""
    gpt2 = Config.from_dict(dict(model_type="gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=4))
    assert gpt2.intermediate_size == 128 and gpt2.tie_word_embeddings and gpt2.hidden_act == "gelu_new"
    assert gpt2.max_position_embeddings == 1024 and gpt2.num_key_value_heads == 4 and gpt2.head_dim == 8
    gemma = Config.from_dict(dict(model_type="gemma2", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=4))
    assert gemma.tie_word_embeddings and gemma.head_dim == 256 and gemma.final_logit_softcapping == 30.0
    assert gemma.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    qwen = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_window_layers=2)
    assert Config.from_dict(qwen).sliding_window is None  # use_sliding_window defaults to false
    on = Config.from_dict({**qwen, "use_sliding_window": True})
    assert on.sliding_window == 8 and [on.is_sliding(i) for i in range(4)] == [False, False, True, True]
    llama = Config.from_dict(dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, sliding_window=3))
    assert llama.num_key_value_heads == 4 and llama.sliding_window is None  # Llama has no window: ignored
    mistral = Config.from_dict(dict(model_type="mistral", vocab_size=50, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=8))
    assert mistral.sliding_window == 4096 and mistral.num_key_value_heads == 8


def test_rope_scaling_spellings():
    """llama3 scaling reads from rope_scaling with `type` or `rope_type`, or from transformers 5's
    rope_parameters (which also carries rope_theta); rope_type default means no scaling."""
    base = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    old = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    a = Config.from_dict({**base, "rope_scaling": {**old, "type": "llama3"}})
    b = Config.from_dict({**base, "rope_scaling": LLAMA3})
    c = Config.from_dict({**base, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert a.rope_scaling == b.rope_scaling == c.rope_scaling == LLAMA3 and c.rope_theta == 500000.0
    d = Config.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert d.rope_scaling is None and d.rope_theta == 1e6


@pytest.mark.parametrize("kw, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope type 'linear' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"llama3 rope_scaling is missing"),
    (dict(sliding_window=4), r"sliding_window=4 is not used by model_type 'llama'"),
    (dict(model_type="qwen2", attention_bias=True), r"attention_bias=True is not used by model_type 'qwen2'"),
    (dict(model_type="gpt2"), r"gpt2 needs num_key_value_heads == num_attention_heads"),
    (dict(model_type="mistral", sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
     r"one attention type for all layers"),
    (dict(model_type="bert"), r"model_type='bert', expected one of"),
])
def test_config_rejects_what_it_cannot_compute(kw, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2), **kw})


# --- sharded and bf16 checkpoints ------------------------------------------------------------------------------
def write_sharded(sd: dict, config: dict, path: Path, max_bytes: int) -> list[str]:
    """A Hugging Face sharded folder: shards of at most max_bytes (or one tensor) plus the index."""
    path.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        if cur and size + t.nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + t.nbytes
    shards.append(cur)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return names


def test_transformers_sharded_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint that transformers writes in several shards loads as bf16, tensor for tensor."""
    hf = hf_model("qwen2", dtype=torch.bfloat16, **BASE)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_pretrained(tmp_path)
    want = hf.state_dict()
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, want[k]), k
    with torch.no_grad():
        ids, _, _ = batch()
        torch.testing.assert_close(ours(ids).float(), hf(ids).logits.float(), atol=0.1, rtol=0.05)


MEMORY_PROBE = textwrap.dedent("""
    # Load checkpoints while recording (a) every float32 tensor the size of a weight that any torch op creates
    # and (b) the peak resident memory above what the process held before the load: VmHWM of this address space
    # (ru_maxrss would not do: Linux carries the parent's high-water mark over fork + exec), less the file pages.
    import json, sys, torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from minicwac.io.hf import load_pretrained

    class Float32Watch(TorchDispatchMode):
        def __init__(self, min_numel):
            super().__init__()
            self.min_numel, self.seen = min_numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta"
                        and t.numel() >= self.min_numel):
                    self.seen.append(f"{func} {tuple(t.shape)}")
            return out

    def status(key):  # bytes
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    results = []
    for path, dtype, min_numel in json.loads(sys.argv[1]):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident size
        except OSError:
            pass
        before, file_before = status("VmRSS"), status("RssFile")
        with Float32Watch(min_numel) as watch:
            m = load_pretrained(path, dtype=getattr(torch, dtype) if dtype else None)
        # the checkpoint's own pages, mapped in as the load reads every weight (its NaN/Inf check), are the page
        # cache, not a copy: left out
        results.append(dict(rise=status("VmHWM") - before - (status("RssFile") - file_before), float32=watch.seen,
                            dtypes=sorted({str(p.dtype) for p in m.parameters()}),
                            nbytes=sum(p.numel() * p.element_size() for p in m.parameters())))
        del m
    print(json.dumps(results))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the memory probe reads Linux's /proc")
def test_sharded_bf16_load_makes_no_float32_copy(tmp_path):
    """A ~45M-parameter bf16 checkpoint in 3 shards loads as bf16 without any weight-sized float32 tensor ever
    existing, and the peak memory rises by about the bf16 weights only (a float32 copy would add 2x that).
    A float32 load of a small checkpoint, by the same probe, shows it does see such copies."""
    cfg = Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg, device="meta").state_dict().items()}
    sd = {k: torch.full(s, 0.01, dtype=torch.bfloat16) for k, s in shapes.items()}
    bf16_bytes = sum(t.nbytes for t in sd.values())
    assert 80e6 < bf16_bytes < 100e6
    names = write_sharded(sd, {**cfg.to_dict(), "torch_dtype": "bfloat16"}, tmp_path / "big", 32 << 20)
    assert len(names) == 3
    del sd
    small = Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    save_pretrained(GPT(small, dtype=torch.bfloat16), None, tmp_path / "small")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # each load in a fresh process: the heap an earlier load freed would be reused by the next one without any
    # rise of the high-water mark (the control then read 0)
    def probe(path, dtype, min_numel):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps([[str(path), dtype, min_numel]])],
                             capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parent.parent)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])[0]

    big, control = probe(tmp_path / "big", None, 1 << 16), probe(tmp_path / "small", "float32", 1 << 13)
    assert big["dtypes"] == ["torch.bfloat16"] and big["nbytes"] == bf16_bytes
    assert big["float32"] == []
    assert big["rise"] < 1.5 * bf16_bytes, big["rise"] / bf16_bytes
    assert control["dtypes"] == ["torch.float32"] and len(control["float32"]) >= 2  # the probe sees copies
    assert control["rise"] > 0


# --- loader errors ---------------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    """A tiny llama checkpoint in 3 shards, and the shard file names."""
    torch.manual_seed(0)
    m = GPT(Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)).eval()
    sd = m.state_dict()
    names = write_sharded(sd, {**m.config.to_dict(), "torch_dtype": "float32"}, tmp_path / "ckpt",
                          sum(t.nbytes for t in sd.values()) // 3)
    assert len(names) >= 3
    return tmp_path / "ckpt", names, m


def test_sharded_checkpoint_loads(sharded):
    path, _, m = sharded
    ids, _, _ = batch()
    with torch.no_grad():
        assert torch.equal(load_pretrained(path)(ids), m(ids))


def test_missing_shard(sharded):
    path, names, _ = sharded
    (path / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{names[1]} is missing; model\.safetensors\.index\.json lists it"):
        load_pretrained(path)


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ('{"metadata": {}}', "has no weight_map"),
                                         ("[1, 2]", "holds a JSON list; expected a JSON object")])
def test_bad_index(sharded, text, match):
    path, _, _ = sharded
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json {match}"):
        load_pretrained(path)


@pytest.mark.parametrize("cut", [0.5, -3])
def test_truncated_shard(sharded, cut):
    path, names, _ = sharded
    f = path / names[-1]
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)] if cut > 0 else data[:cut])
    with pytest.raises(ValueError, match=rf"{names[-1]} is not a readable safetensors file"):
        load_pretrained(path)


def test_missing_tensor_in_shards(sharded):
    path, names, _ = sharded
    f = path / names[0]
    sd = load_file(str(f))
    gone = sorted(sd)[0]
    del sd[gone]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=rf"index\.json: missing tensor {re.escape(gone)} \(1 missing in all\)"):
        load_pretrained(path)


def test_tensor_in_two_shards(sharded):
    path, names, _ = sharded
    a, b = load_file(str(path / names[0])), load_file(str(path / names[1]))
    k = next(iter(a))
    save_file({**b, k: a[k]}, str(path / names[1]))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(k)} is also in"):
        load_pretrained(path)


@pytest.fixture
def gpt2_ckpt(tmp_path):
    """A tiny GPT-2 checkpoint written by transformers, and a helper rewriting its tensors."""
    _, kw = FAMILIES["gpt2"]
    hf_model("gpt2", **kw).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"

    def edit(fn):
        sd = load_file(str(f))
        fn(sd)
        save_file(sd, str(f), metadata={"format": "pt"})

    return tmp_path, edit


def test_gpt2_known_buffers_are_ignored(gpt2_ckpt):
    """GPT-2's attn.bias / attn.masked_bias buffers (older saves) and rotary inv_freq are skipped by name."""
    path, edit = gpt2_ckpt
    before = load_pretrained(path).state_dict()

    def add(sd):
        sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        sd["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)

    edit(add)
    after = load_pretrained(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gpt2_without_prefix_loads(gpt2_ckpt):
    """Checkpoints saved from GPT2Model (e.g. the original gpt2) have no `transformer.` prefix."""
    path, edit = gpt2_ckpt
    before = load_pretrained(path).state_dict()
    edit(lambda sd: sd.update({k.removeprefix("transformer."): sd.pop(k) for k in list(sd)}))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()
    after = load_pretrained(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gpt2_unexpected_tensor(gpt2_ckpt):
    path, edit = gpt2_ckpt
    edit(lambda sd: sd.__setitem__("transformer.h.0.attn.extra", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor transformer\.h\.0\.attn\.extra"):
        load_pretrained(path)


def test_gpt2_missing_tensor(gpt2_ckpt):
    path, edit = gpt2_ckpt
    edit(lambda sd: sd.pop("transformer.h.1.attn.c_attn.weight"))
    with pytest.raises(ValueError, match=r"missing tensor transformer\.h\.1\.attn\.c_attn\.weight"):
        load_pretrained(path)


def test_gpt2_shape_that_does_not_match_config(gpt2_ckpt):
    """The checkpoint's own layout is checked: c_attn is (in, 3 * out) for a Conv1D."""
    path, edit = gpt2_ckpt
    edit(lambda sd: sd.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(192, 64)))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight has shape \(192, 64\), "
                                         r"expected \(64, 192\) from config\.json"):
        load_pretrained(path)


def test_rotary_inv_freq_is_ignored(tmp_path):
    """Older transformers saved RoPE's inv_freq buffers; they are skipped by name, not reported as unexpected."""
    torch.manual_seed(0)
    m = GPT(Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)).eval()
    path = save_pretrained(m, None, tmp_path / "ckpt")
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    sd["model.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, str(path / "model.safetensors"))
    ids, _, _ = batch()
    with torch.no_grad():
        assert torch.equal(load_pretrained(path)(ids % 50), m(ids % 50))


@pytest.mark.parametrize("edit, match", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"invalid config \(rope type 'yarn' is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"gpt2 with scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(n_embd=None), r"config\.json: invalid config \(n_embd is missing; a gpt2 config\.json needs it\)"),
    (dict(intermediate_size=None), r"invalid config \(intermediate_size is missing; a llama config\.json needs it"),
])
def test_unsupported_config_options(tmp_path, edit, match):
    mt = "gpt2" if set(edit) & {"scale_attn_by_inverse_layer_idx", "n_embd"} else "llama"
    torch.manual_seed(0)
    cfg = Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, model_type=mt)
    path = save_pretrained(GPT(cfg), None, tmp_path / "ckpt")
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, **edit}))
    with pytest.raises(ValueError, match=match):
        load_pretrained(path)
