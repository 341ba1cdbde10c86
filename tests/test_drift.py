"""The drift map's arithmetic, pinned on a tiny model where the test sets dW by hand."""
from __future__ import annotations

import copy

import pytest
import torch

from minicwac.core.drift import drift_map


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
    from minicwac.hf import save_pretrained
    from minicwac.model import GPT
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
