"""LoRA with the exact constraint: A <- A - (A S) S^T keeps (W - W0) S = 0 whatever B does; merged and PEFT-layout
folders load in transformers / peft with the same logits; the same projection on a PEFT model; LoRA + CWAC on 2
FSDP ranks equals 1."""
from __future__ import annotations

import json

import pytest
import torch
from test_dist import ARGS, _weights, folder  # noqa: F401 -- the tiny model, kit and data fixture
from test_kit import HARMFUL

from minicwac.io import dist
from minicwac.__main__ import main
from minicwac.core.cwac import Constraints, Schedule, finetune_cwac
from minicwac.core.lora import LoRALinear, LoRASettings, add_lora, constrain_peft_, lora_modules, merge_lora
from minicwac.core.subspace import ALL_LINEARS, Subspace, compute_subspace
from minicwac.io.hf import load_checkpoint, load_tokenizer
from minicwac.kit import Kit, RunOptions, encode_data, finetune, load_conversations


def _prompts(n=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _seqs(n=32, vocab=97, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, vocab, (k,), generator=g).tolist(), [0] * 3 + [1] * (k - 3))
            for k in torch.randint(6, 14, (n,), generator=g).tolist()]


def test_lora_layer_starts_at_the_base_model_and_merges_exactly(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
    names = add_lora(model, LoRASettings(r=4, alpha=8))
    assert len(names) == 7 * 2 and all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}  # only the adapters train
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)  # B = 0: the base model exactly
        for m in lora_modules(model).values():
            m.lora_B.normal_()
        adapted = model(ids)
        m = lora_modules(model)[names[0]]
        x = torch.randn(3, m.in_features)
        torch.testing.assert_close(m(x), x @ m.merged().T, atol=1e-5, rtol=0)  # W0 + (alpha / r) B A, scale 2
        assert m.scale == 2.0
    merge_lora(model)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [("down_proj",), ("all",)])
def test_the_adapter_constraint_is_exact_whatever_b_does(make_model, targets):
    """5 CWAC steps at a high lr: (W - W0) S stays 0 on every constrained target (<= 1e-6 of W0 S); without the
    projection the same run leaks, so the check can fail."""
    pats = ALL_LINEARS if targets == ("all",) else (r"model\.layers\.\d+\.mlp\.down_proj",)

    def run(project):
        model = make_model()
        sub = compute_subspace(model, _prompts(), 0, patterns=pats, energy=0.9)
        add_lora(model, LoRASettings(r=4))
        finetune_cwac(model, _seqs(), Schedule(5, 8, 1e-2, warmup=1), Constraints(sub, None, 0.5, 16, project_update=project),
                      progress=False)
        assert all(float(m.lora_B.detach().abs().max()) > 0 for m in lora_modules(model).values())  # B did move
        return model, sub

    model, sub = run(True)
    assert sub.ws_error(model) <= 1e-6
    for n, m in lora_modules(model).items():
        if n in sub.S:
            A = m.lora_A.detach()
            assert float((A @ sub.S[n]).norm() / A.norm()) <= 1e-6
    merge_lora(model)
    assert sub.ws_error(model) <= 1e-6  # the merged weights: W S = W0 S
    free, sub = run(False)
    assert sub.ws_error(free) > 1e-3


def test_lora_finetune_merged_and_adapter_folders(folder, tmp_path):  # noqa: F811
    d = folder
    base = ["finetune", "--model", str(d / "aligned"), "--data", str(d / "data.jsonl"), "--kit", str(d / "kit"),
            "--lora-r", "4", *ARGS]
    assert main([*base, "--out", str(tmp_path / "merged")]) == 0
    assert main([*base, "--out", str(tmp_path / "adapter"), "--save-adapter"]) == 0
    sub = Subspace.load(d / "kit" / "subspace")
    merged, tok = load_checkpoint(tmp_path / "merged")
    aligned, _ = load_checkpoint(d / "aligned")
    assert sub.ws_error(merged) <= 1e-6
    h = json.loads((tmp_path / "merged" / "history.json").read_text())
    assert h["run"]["lora"]["r"] == 4 and h["ws_error"] <= 1e-6
    changed = [n for (n, a), b in zip(aligned.named_parameters(), merged.parameters()) if not torch.equal(a, b)]
    assert changed and all(n.endswith("_proj.weight") for n in changed)  # only the adapted linears moved
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "history.json"} <= set(files)
    assert "model.safetensors" not in files
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": HARMFUL[0]}], add_generation_prompt=True)[0]])
    ours_again, _ = load_checkpoint(tmp_path / "adapter")  # the adapter folder, put onto its base and merged
    for (n, a), b in zip(merged.named_parameters(), ours_again.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=n)
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    assert main(["eval", "--model", str(tmp_path / "adapter"), "--harmful", str(tmp_path / "harmful.txt"),
                 "--max-new-tokens", "2"]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "gone"}))
    with pytest.raises(FileNotFoundError, match="'gone', which is not a local model folder"):
        load_checkpoint(tmp_path / "adapter")
    transformers = pytest.importorskip("transformers", reason="the load checks use transformers (test-only)")
    peft = pytest.importorskip("peft", reason="the adapter check uses peft (test-only)")
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(d / "aligned", attn_implementation="eager")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    hf_adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = merged(ids)
        torch.testing.assert_close(hf_merged.eval()(ids).logits, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_adapted(ids).logits, ours, atol=1e-4, rtol=0)  # the same run, both ways
    for bad, match in ((["--lora-r", "0"], "must be >= 1"), (["--save-adapter"], "need --lora-r"),
                       (["--lora-r", "2", "--lora-targets", "c_attn"], "invalid choice")):
        with pytest.raises(SystemExit, match=match):
            main(["finetune", "--model", str(d / "aligned"), "--data", str(d / "data.jsonl"), "--kit", str(d / "kit"),
                  "--out", str(tmp_path / "bad"), *bad, *ARGS])
    assert not (tmp_path / "bad").exists()


def test_constrain_peft_keeps_a_peft_model_exact():
    """peft's own LoRA on a tiny transformers Llama, 3 AdamW steps with constrain_peft_ after each: the merged
    update leaks <= 1e-6 into the safety subspace of every down_proj; without it, it does not."""
    transformers = pytest.importorskip("transformers", reason="test-only dependency")
    peft = pytest.importorskip("peft", reason="test-only dependency")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def run(constrain):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(cfg).eval()
        sub = compute_subspace(base, _prompts(), 0, energy=0.9)
        W0 = {n: base.get_submodule(n).weight.detach().clone() for n in sub.S}
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"],
                                                          init_lora_weights=True))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if constrain:
                assert constrain_peft_(model, sub) == 2  # one lora_A per down_proj
        merged = model.merge_and_unload()
        return max(float(((merged.get_submodule(n).weight - W0[n]) @ S).norm() / sub.W0S[n].norm())
                   for n, S in sub.S.items()), merged

    leak, merged = run(True)
    assert leak <= 1e-6
    free, _ = run(False)
    assert free > 1e-3
    with pytest.raises(ValueError, match="no LoRA module"):
        constrain_peft_(merged, Subspace({"model.layers.0.mlp.down_proj": torch.eye(64)[:, :2]},
                                         {"model.layers.0.mlp.down_proj": torch.zeros(32, 2)}))


def _lora_rank(proc, d, out, offload=False):
    """A rank of a LoRA run as the command line starts it: the model sharded as it is read, adapters included."""
    lora = LoRASettings(r=4)
    model = dist.load_pretrained(d / "aligned", proc, offload=offload, lora=lora)
    tok = load_tokenizer(d / "aligned")
    kit = Kit.load(d / "kit", model)
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    finetune(model, tok, seqs, kit, d / out, method="cwac", steps=5, batch_size=4, lr=1e-3, progress=False,
             lora=lora, run=RunOptions(proc=proc, checkpointing=True, offload=offload))


def test_lora_cwac_on_two_ranks_matches_one(folder):  # noqa: F811
    """LoRA + CWAC under FSDP2 on 2 proc, with activation checkpointing, against one process without it; the
    same with the shards offloaded to CPU memory."""
    d = folder
    model, tok = load_checkpoint(d / "aligned", dtype=torch.float32)
    seqs, _ = encode_data(tok, load_conversations(d / "data.jsonl"), 64)
    finetune(model, tok, seqs, Kit.load(d / "kit", model), d / "lora-one", method="cwac", steps=5, batch_size=4,
             lr=1e-3, progress=False, lora=LoRASettings(r=4))
    dist.run_local(_lora_rank, 2, d, "lora-two")  # + activation checkpointing inside the sharded blocks
    one, two = _weights(d / "lora-one"), _weights(d / "lora-two")
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=0, msg=n)
    dist.run_local(_lora_rank, 2, d, "lora-offload", True)  # CPU offload of shards, gradients and AdamW states
    for n, w in _weights(d / "lora-offload").items():
        torch.testing.assert_close(w, two[n], atol=0, rtol=0, msg=n)
    h = json.loads((d / "lora-two" / "history.json").read_text())
    assert h["ranks"] == 2 and h["ws_error"] <= 1e-6
    assert Subspace.load(d / "kit" / "subspace").ws_error(load_checkpoint(d / "lora-two")[0]) <= 1e-6


def test_ws_error_of_a_lora_model_by_hand(make_model):
    """||(W + scale B A) S - W0S|| / ||W0S||, the worst target, with random A and B and scale = alpha / r = 3
    (a check that dropped the scale, or used B A without it, would be off by that factor)."""
    model = make_model(seed=0)
    harmful = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [20, 21, 22, 23, 24, 25]]
    sub = compute_subspace(model, harmful, pad_id=0, energy=0.9)
    add_lora(model, LoRASettings(r=2, alpha=6))
    g = torch.Generator().manual_seed(3)
    want = 0.0
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
            if name in sub.S:
                S, W0S = sub.S[name].double(), sub.W0S[name].double()
                W = m.weight.double() + 3.0 * m.lora_B.double() @ m.lora_A.double()  # the effective weight
                want = max(want, float((W @ S - W0S).norm() / W0S.norm()))
    assert m.scale == 3.0
    assert sub.ws_error(model) == pytest.approx(want, rel=1e-5)


def test_the_drift_map_of_an_unmerged_lora_model_is_that_of_its_merged_weights(make_model):
    import copy

    from minicwac.core.drift import drift_map

    base = make_model(seed=0)
    model = copy.deepcopy(base)
    add_lora(model, LoRASettings(r=2, alpha=6), seed=1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))  # B != 0: the adapters change W
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [20, 21, 22, 23, 24, 25]]
    unmerged = drift_map(base, model, prompts, 0)
    merged = drift_map(base, merge_lora(copy.deepcopy(model)), prompts, 0)
    assert max(t["dW_h0"] for t in unmerged["linears"].values()) > 1e-3, "the adapters should move the outputs"
    for name, t in merged["linears"].items():
        for k, v in t.items():
            assert unmerged["linears"][name][k] == pytest.approx(v, rel=1e-5, abs=1e-8), (name, k)


def test_the_default_scale_is_two():
    """alpha defaults to 2 r (scale 2), as the docs and the adapter folder's lora_alpha say."""
    assert LoRASettings(r=4).scale == 2.0 and LoRASettings(r=8, alpha=8).scale == 1.0


def test_the_gradient_only_variant_projects_the_adapter_gradient(make_model):
    """project_grad without project_update on a LoRA model: under SGD the step of A has no component on S
    (A's gradient is the one projected: W0 is frozen and has none); without it the share is ~sqrt(k / in)."""
    from minicwac.core.cwac import cwac_step
    from minicwac.core.data import collate
    model = make_model()
    sub = compute_subspace(model, _prompts(), 0, energy=0.9)
    add_lora(model, LoRASettings(r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))  # B = 0 would give A no gradient
    before = {n: m.lora_A.detach().clone() for n, m in lora_modules(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cwac_step(model.train(), opt, collate(_seqs()[:8], 0), subspace=sub, project_update=False, project_grad=True,
              grad_clip=1e9)
    for n, S in sub.S.items():
        dA = lora_modules(model)[n].lora_A.detach() - before[n]
        assert dA.norm() > 0 and float((dA @ S).norm()) <= 1e-4 * float(dA.norm()), n  # float32 round-off: ~1e-6
