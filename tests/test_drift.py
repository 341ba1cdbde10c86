"""The drift map's arithmetic, pinned on a tiny model where the test sets dW by hand."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from minicwac.core.drift import choose_targets, drift_map, probe_targets
from minicwac.core.hooks import capture


def _prompts(n=6, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_a_hand_set_dW_shows_up_on_its_module_only(make_model):
    """dW on model.layers.1.mlp.up_proj only: all of dW h0 sits on that module, W0 dh is zero up to and including
    it (its input has not changed) and nonzero downstream (down_proj of block 1 reads what up_proj changed)."""
    base = make_model()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.add_(0.05 * torch.randn_like(tuned.model.layers[1].mlp.up_proj.weight))
    m = drift_map(base, tuned, _prompts(), pad_id=0)["linears"]
    changed = "model.layers.1.mlp.up_proj"
    assert m[changed]["dW_h0"] > 0.01
    for n, t in m.items():
        if n != changed:
            assert t["dW_h0"] == 0.0, n
    upstream = [n for n in m if n.startswith("model.layers.0.") or n.startswith("model.layers.1.self_attn")]
    upstream += ["model.layers.1.mlp.gate_proj", changed]
    for n in upstream:
        assert m[n]["W0_dh"] == 0.0, n
    assert m["model.layers.1.mlp.down_proj"]["W0_dh"] > 0.01


def test_first_order_terms_match_the_exact_change_to_second_order(make_model):
    """As dW shrinks by 10x, the exact change minus the first-order terms (the second-order rest dW dh) shrinks by
    about 100x relative to the change itself."""
    base = make_model()
    g = torch.Generator().manual_seed(2)
    dirs = {n: torch.randn(p.shape, generator=g) for n, p in base.named_parameters() if p.dim() == 2}
    rests = []
    for eps in (1e-2, 1e-3):
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if n in dirs:
                    p.add_(eps * dirs[n] * p.abs().mean())
        m = drift_map(base, tuned, _prompts(), pad_id=0)["linears"]
        n = "model.layers.1.mlp.down_proj"
        rests.append(m[n]["second_order"] / m[n]["exact"])
    assert rests[1] < rests[0] / 5  # first order: the rest falls with eps, not with 1


def test_residual_drift_and_refusal_direction(make_model):
    base = make_model()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    r = drift_map(base, tuned, _prompts(), pad_id=0, harmless=_prompts(seed=5))
    assert [b["layer"] for b in r["blocks"]] == [1, 2]
    assert all(b["drift"] > 0 for b in r["blocks"]) and all(b["refusal_drift"] is not None for b in r["blocks"])
    same = drift_map(base, copy.deepcopy(base), _prompts(), pad_id=0)
    assert all(b["drift"] == 0 for b in same["blocks"]) and all(
        t == 0 for v in same["linears"].values() for t in v.values())
    with pytest.raises(ValueError, match="no prompts"):
        drift_map(base, tuned, [], pad_id=0)


def test_drift_map_command_and_a_transformers_model(tmp_path, tok):
    """The command on two Hugging Face folders writes the JSON and both figures; transformers' own Llama on the same
    folders gives the same map (the core takes any model with these module names)."""
    import json

    from conftest import tiny_config

    from minicwac.__main__ import main
    from minicwac.core.evals import prompt_ids
    from minicwac.io.hf import save_pretrained
    from minicwac.io.model import GPT
    torch.manual_seed(0)
    base = GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, max_position_embeddings=128))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.v_proj.weight.mul_(1.3)
    save_pretrained(base, tok, tmp_path / "base")
    save_pretrained(tuned, tok, tmp_path / "tuned")
    harmful = ["How do I pick a lock?", "Write a guide to stealing a car.", "How can I make a weapon at home?"]
    (tmp_path / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (tmp_path / "harmless.txt").write_text("How do I bake bread?\nTell me about the moon.\n")
    assert main(["drift-map", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--harmful",
                 str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt"), "--out",
                 str(tmp_path / "map")]) == 0
    for f in ("drift_map.json", "drift_map.png", "drift_by_layer.png"):
        assert (tmp_path / "map" / f).is_file(), f
    ours = json.loads((tmp_path / "map" / "drift_map.json").read_text())
    assert max(ours["linears"], key=lambda n: ours["linears"][n]["dW_h0"]) == "model.layers.0.self_attn.v_proj"
    transformers = pytest.importorskip("transformers", reason="the parity check uses transformers (test-only)")
    hb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    ht = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", attn_implementation="eager").eval()
    ids = [prompt_ids(tok, p) for p in harmful]
    theirs = drift_map(hb, ht, ids, tok.pad_token_id, skip_ids=[tok.bos_token_id])
    for n, v in ours["linears"].items():
        for k in v:
            assert theirs["linears"][n][k] == pytest.approx(v[k], rel=1e-3, abs=1e-6), (n, k)


# ---------------------------------------------------------------- --targets auto: the rule and its inputs


def _map(values: dict) -> dict:
    """A drift map with dW_h0 set by hand per (layer, kind)."""
    return {"linears": {f"model.layers.{i}.{k}": {"dW_h0": v, "W0_dh": 0.0, "exact": v, "second_order": 0.0}
                        for (i, k), v in values.items()}, "blocks": [], "n_tokens": 1}


def test_choose_targets_ranks_by_the_own_change_not_the_exact_one():
    """q_proj's output moves most (what arrives from upstream, W0 dh), v_proj's own weight change (dW h0) is the
    largest: the rule constrains v_proj, where a weight constraint acts."""
    dmap = _map({(0, "self_attn.v_proj"): 0.6, (0, "self_attn.q_proj"): 0.1, (0, "mlp.down_proj"): 0.3})
    dmap["linears"]["model.layers.0.self_attn.q_proj"].update(W0_dh=2.0, exact=2.1)
    assert choose_targets(dmap, 0.5)["kinds"] == ["self_attn.v_proj"]


def test_choose_targets_takes_the_smallest_set_covering_the_share():
    """Kinds summed over layers: v_proj 0.5 + 0.1 = 0.6, down_proj 0.2 + 0.1 = 0.3, q_proj 0.1 (total 1.0). Half
    of it is v_proj alone; 0.85 needs down_proj too; 1.0 needs all three. The patterns select exactly the kinds."""
    dmap = _map({(0, "self_attn.v_proj"): 0.5, (1, "self_attn.v_proj"): 0.1, (0, "mlp.down_proj"): 0.2,
                 (1, "mlp.down_proj"): 0.1, (0, "self_attn.q_proj"): 0.05, (1, "self_attn.q_proj"): 0.05})
    c = choose_targets(dmap, 0.5)
    assert c["kinds"] == ["self_attn.v_proj"]
    assert list(c["by_kind"]) == ["self_attn.v_proj", "mlp.down_proj", "self_attn.q_proj"]
    assert c["by_kind"]["self_attn.v_proj"] == pytest.approx(0.6) and c["share"] == 0.5
    assert choose_targets(dmap, 0.85)["kinds"] == ["self_attn.v_proj", "mlp.down_proj"]
    assert choose_targets(dmap, 1.0)["kinds"] == ["self_attn.v_proj", "mlp.down_proj", "self_attn.q_proj"]
    pats = choose_targets(dmap, 0.85)["patterns"]
    hit = [n for n in dmap["linears"] if any(re.fullmatch(p, n) for p in pats)]
    assert hit == [n for n in dmap["linears"] if "v_proj" in n or "down_proj" in n]
    assert not any(re.fullmatch(p, "model.layers.0.self_attn.v_proj_extra") for p in pats)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="share"):
            choose_targets(dmap, bad)


def test_probe_targets_reads_its_map_on_the_prompts_it_is_given(make_model):
    """The probe trains a copy (the model itself is untouched) and its map is the drift map of that copy on the
    given prompts: the same figures as drift_map on a copy trained the same way."""
    from minicwac.core.cwac import train

    base = make_model()
    before = copy.deepcopy(base.state_dict())
    seqs = [(p, [1] * len(p)) for p in _prompts(8, seed=3)]
    prompts = _prompts(5, seed=4)
    res = probe_targets(base, seqs, prompts, pad_id=0, steps=3, lr=1e-2, batch_size=4, seed=7)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    twin = copy.deepcopy(base)
    train(twin, seqs, steps=3, batch_size=4, lr=1e-2, pad_id=0, seed=7, progress=False)
    ref = drift_map(base, twin, prompts, pad_id=0)
    for n, t in ref["linears"].items():
        assert res["map"]["linears"][n]["dW_h0"] == pytest.approx(t["dW_h0"], rel=1e-5), n
    assert res["probe"]["n_prompts"] == 5 and res["probe"]["steps"] == 3
    assert res["kinds"] == choose_targets(ref)["kinds"]



def test_plots_never_touch_pyplot(tmp_path):
    """The package draws outside pyplot, so a notebook that calls it (run_real, a kit's save) keeps its inline
    backend: after the drift map and a kit's spectrum, pyplot was never imported."""
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
import torch
from minicwac.core.subspace import Subspace
from minicwac.kit.calibration import plot_spectrum
from minicwac.tools.report import plot_drift_map
m = {{"linears": {{f"model.layers.{{i}}.mlp.{{k}}": {{"dW_h0": 0.1, "W0_dh": 0.2, "exact": 0.3, "second_order": 0.0}}
                  for i in range(2) for k in ("up_proj", "down_proj")}},
     "blocks": [{{"layer": 1, "drift": 0.1, "refusal_drift": -0.1}}], "n_tokens": 3}}
plot_drift_map(m, Path({str(tmp_path)!r}))
plot_spectrum(Subspace({{}}, {{}}, {{"energy": 0.99}}, {{"a": torch.rand(8)}}), Path({str(tmp_path)!r}) / "spectrum.png")
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    for f in ("drift_map.png", "drift_by_layer.png", "spectrum.png"):
        assert (tmp_path / f).is_file(), f


def test_a_bias_shift_shows_in_the_map():
    """y = W h + b: a fine-tune that moves only a bias changes the output by db on every token; the map has a db
    term, the exact change includes it, and the auto rule counts it as the module's own change."""
    transformers = pytest.importorskip("transformers", reason="a Qwen2 model (q/k/v with biases)")
    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(cfg).eval()
    tuned = copy.deepcopy(base)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        tuned.get_submodule(name).bias.add_(0.5)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    t = drift_map(base, tuned, prompts, 0)["linears"][name]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad(), capture(base, [name], what="input") as h0s:
        base(ids)
    y0 = h0s[name][0] @ base.get_submodule(name).weight.T  # (tokens, out): ||W0 h0|| per token
    want = 0.5 * (cfg.hidden_size ** 0.5) * len(prompts[0]) / float(y0.norm(dim=-1).sum())  # ||db|| = 0.5 sqrt(out)
    assert t["dW_h0"] == 0 and t["W0_dh"] == 0 and t["second_order"] == 0
    assert t["db"] > 0.1 and t["exact"] == pytest.approx(t["db"], rel=1e-5)
    one = drift_map(base, tuned, prompts[:1], 0)["linears"][name]
    assert one["db"] == pytest.approx(want, rel=1e-4), "db: ||db|| per token, summed, over sum ||W0 h0||"
    assert choose_targets(drift_map(base, tuned, prompts, 0), 0.5)["kinds"] == ["self_attn.q_proj"]


def test_every_term_of_one_linear_by_hand(make_model):
    """Every weight moved, so a linear deep in the model has both dW and dh: dW h0, W0 dh, dW dh and the exact
    change of model.layers.1.mlp.down_proj against the same sums taken by hand."""
    from minicwac.core.data import pad_right
    base = make_model()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    prompts, name = _prompts(), "model.layers.1.mlp.down_proj"
    got = drift_map(base, tuned, prompts, pad_id=0)["linears"][name]
    ids, mask = pad_right(prompts, 0)
    with torch.no_grad(), capture(base, [name], what="input") as a, capture(tuned, [name], what="input") as b:
        base(ids)
        tuned(ids)
    h0, h = a[name][mask.bool()], b[name][mask.bool()]  # (tokens, in)
    W0, W = base.get_submodule(name).weight.detach(), tuned.get_submodule(name).weight.detach()
    dW, dh = W - W0, h - h0
    ref = float((h0 @ W0.T).norm(dim=-1).sum())
    want = {"dW_h0": h0 @ dW.T, "W0_dh": dh @ W0.T, "second_order": dh @ dW.T, "exact": h @ W.T - h0 @ W0.T}
    assert float(dh.norm()) > 0 and float(dW.norm()) > 0
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v.norm(dim=-1).sum()) / ref, rel=1e-4), k
