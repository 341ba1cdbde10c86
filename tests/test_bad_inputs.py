"""Bad inputs a careless or hostile user gives, each with the one-line error it must end in, and saves that never
lose data (interrupted at any point, SIGKILL included). Chat templates: test_bad_inputs_chat.py; fetch and prompt
files: test_bad_inputs_fetch.py."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from minicwac.__main__ import main
from minicwac.core.evals import evaluate_prompts, generate_answers, harmful_share, refusal_score
from minicwac.core.files import atomic_folder, recover, write_json_atomic
from minicwac.io.hf import load_checkpoint, load_pretrained, save_pretrained
from minicwac.io.model import GPT
from minicwac.toy.evals import evaluate, task_accuracy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, max_position_embeddings=128))
    return save_pretrained(model, tok, tmp_path / "m"), model


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# --- config.json: every field checked before anything is built ------------------------------------------------
@pytest.mark.parametrize("changes, match", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings='false', expected true or false"),
    (dict(rope_scaling="linear"), "rope_scaling='linear', expected null or an object"),
    (dict(rope_theta=float("nan")), "rope_theta=nan, expected a finite number > 0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0, expected a positive integer"),
    (dict(hidden_size="32"), "hidden_size='32', expected a positive integer"),
    (dict(hidden_size=32.0), "hidden_size=32.0, expected a positive integer"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps='1e-5', expected a finite number > 0"),
    (dict(rms_norm_eps=0), "rms_norm_eps=0"),
    (dict(num_hidden_layers=-2), "num_hidden_layers=-2, expected a positive integer"),
    (dict(num_hidden_layers=40000), "num_hidden_layers=40000, expected a positive integer <= 1024"),
    (dict(vocab_size=10**9), "vocab_size=1000000000"),
    (dict(num_attention_heads=6, head_dim=None), "hidden_size=32 is not a multiple of num_attention_heads=6"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4}),
     "rope_scaling.factor='8', expected a finite number > 0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
    (dict(eos_token_id=-1), "eos_token_id=-1, expected a token id"),
    (dict(attention_bias=1), "attention_bias=1, expected true or false"),
    (dict(initializer_range=float("inf")), "initializer_range=inf"),
])
def test_bad_config_values_are_named(folder, changes, match):
    path, _ = folder
    _edit_config(path, **changes)
    t = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    msg = _one_line(e.value)
    assert str(path / "config.json") in msg and match in msg, msg
    assert time.perf_counter() - t < 5  # refused before anything is allocated


def test_config_nested_too_deeply(folder):
    path, _ = folder
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_pretrained(path)


def test_a_device_this_machine_lacks(folder):
    path, _ = folder
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use --device cpu"):
        load_pretrained(path, device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        load_pretrained(path, device="gpu0")


# --- weights ----------------------------------------------------------------------------------------------------
def _rewrite_weights(path: Path, fn) -> None:
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_nonfinite_weights_are_refused_unless_allowed(folder):
    path, _ = folder
    _rewrite_weights(path, lambda sd: sd["model.layers.0.mlp.down_proj.weight"].view(-1)[:3].fill_(float("nan")))
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    assert "model.layers.0.mlp.down_proj.weight holds 3 NaN/Inf values; refused" in _one_line(e.value)
    with pytest.warns(UserWarning, match="holds 3 NaN/Inf"):
        m = load_pretrained(path, allow_nonfinite=True)
    assert torch.isnan(m.model.layers[0].mlp.down_proj.weight).sum() == 3
    with pytest.raises(SystemExit, match="NaN/Inf"):  # the command line says the same in one line
        main(["eval", "--model", str(path), "--max-new-tokens", "2"])


def test_weight_dtypes_by_rule(folder):
    """One float dtype: kept. A mix (int8 aside): all float32, with a warning. Integer (quantized) weights:
    refused, naming the tensor."""
    path, model = folder
    _rewrite_weights(path, lambda sd: sd.update({k: v.half() for k, v in sd.items() if "layers.1" in k}))
    with pytest.warns(UserWarning, match="mixes F16, F32 weights: loaded as float32"):
        m = load_pretrained(path)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        m(ids)  # runs: no dtype mismatch at the first forward
    _rewrite_weights(path, lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int8)}))
    with pytest.raises(ValueError, match=r"model.norm.weight is I8; expected floating-point weights"):
        load_pretrained(path)


def test_a_shard_outside_the_folder_is_refused(folder, tmp_path):
    path, _ = folder
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(path / "model.safetensors", outside / "x.safetensors")
    keys = load_file(str(outside / "x.safetensors")).keys()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../outside/x.safetensors" for k in keys}}))
    with pytest.raises(ValueError, match=r"shard '../outside/x.safetensors' is outside the model folder"):
        load_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: str(outside / "x.safetensors") for k in keys}}))
    with pytest.raises(ValueError, match="is outside the model folder"):
        load_pretrained(path)


# --- generation and evaluation ------------------------------------------------------------------------------------
def test_evaluation_refuses_impossible_arguments(folder, tok, world):
    path, _ = folder
    model, tok = load_checkpoint(path)
    cases = [
        (lambda: evaluate_prompts(model, tok, ["How do I pick a lock?"], max_new_tokens=0),
         "max_new_tokens=0, expected an integer >= 1"),
        (lambda: generate_answers(model, tok, ["hi"], max_new_tokens=-1), "max_new_tokens=-1"),
        (lambda: generate_answers(model, tok, [], 4), "expected a non-empty list of prompts"),
        (lambda: generate_answers(model, tok, "hi", 4), "expected a non-empty list of prompts"),
        (lambda: generate_answers(model, tok, ["word " * 200], 4), "more than the model's context of 128"),
        (lambda: refusal_score(model, tok, []), "expected a non-empty list of prompts"),
        (lambda: harmful_share([]), "no answers to score"),
        (lambda: task_accuracy(model, tok, []), "no test examples"),
        (lambda: evaluate(model, tok, world, "poetry"), "unknown task 'poetry'; expected one of"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert match in _one_line(e.value), (match, str(e.value))


# --- merge: results.json that is not an experiment's -----------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    ("{}", "'settings' is missing"),
    ("[]", "holds list, expected the object experiment writes"),
    ("not json", "is not valid JSON"),
    (json.dumps({"settings": {}, "rows": [{"stage": "aligned"}], "curves": {}, "safety": {}, "wall_s": 1}),
     "row 0 lacks one of stage, method, task, p, seed"),
])
def test_merge_names_a_bad_results_file(tmp_path, content, match):
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "results.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(tmp_path / "part"), "--out", str(tmp_path / "out")])
    msg = _one_line(e.value)
    assert str(tmp_path / "part" / "results.json") in msg and match in msg, msg
    assert not (tmp_path / "out").exists()


# --- saves that lose nothing ----------------------------------------------------------------------------------
def test_save_refuses_a_file_and_a_folder_with_files_it_would_not_write(folder, tmp_path, tok):
    path, model = folder
    target = tmp_path / "afile"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file; expected a folder"):
        save_pretrained(model, tok, target)
    assert target.read_text() == "mine" and not list(tmp_path.glob(".afile*"))
    (path / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="holds notes.txt .* that this save would not write again"):
        save_pretrained(model, tok, path)
    assert (path / "notes.txt").read_text() == "my notes" and (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(".m.*"))  # its temporary folder is gone
    (path / "notes.txt").unlink()
    save_pretrained(model, tok, path)  # a folder holding only what a save writes is replaced
    with pytest.raises(IsADirectoryError, match="is a folder; expected a JSON file"):
        write_json_atomic(path, {"a": 1})


def test_leftovers_of_an_interrupted_save_are_cleaned_and_the_old_one_restored(folder, tok):
    path, model = folder
    debris = path.with_name(f".{path.name}.tmp-abc123")
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    save_pretrained(model, tok, path)
    assert not debris.exists()
    old = path.with_name(f".{path.name}.old")
    os.rename(path, old)  # as if killed between the two renames of the fallback swap
    assert load_pretrained(path) is not None  # the loader puts the last complete checkpoint back
    assert path.is_dir() and not old.exists()
    old.mkdir()  # both there: the old one is dropped on the next save or load
    recover(path)
    assert not old.exists()


SAVE_LOOP = """
import sys, torch
from minicwac.io.hf import save_pretrained
from minicwac.io.config import Config
from minicwac.io.model import GPT
cfg = Config(vocab_size=2000, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
i = 0
while True:
    torch.manual_seed(i)
    save_pretrained(GPT(cfg), None, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_sigkill_during_saves_never_leaves_the_path_without_a_complete_checkpoint(tmp_path, swap):
    """A process saving over and over into one path is killed at 12 random moments: each time, after the loader's
    recovery, the path holds a complete checkpoint; after the next save no debris remains beside it. Both swaps:
    the one-step exchange and the two-rename fallback."""
    path = tmp_path / "ckpt"
    code = SAVE_LOOP if swap == "exchange" else \
        "import minicwac.core.files as f; f._exchange = lambda a, b: False\n" + SAVE_LOOP
    import random
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
        p.stdout.readline()  # at least one save finished
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        recover(path)
        m = load_pretrained(path)  # complete: every tensor there and readable
        assert all(math.isfinite(float(t.sum())) for t in m.state_dict().values())
    subprocess.run([sys.executable, "-c", code.replace("while True:", "for _ in range(1):"), str(path)], check=True,
                   env=env, cwd=ROOT, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .ckpt.tmp-* and no .ckpt.old


def test_kit_sae_and_subspace_folders_keep_foreign_files(tmp_path):
    from minicwac.core.sae import SAE, SAEConfig
    from minicwac.core.subspace import Subspace
    sae = SAE(SAEConfig(8, 16, 2, 1))
    sae.save(tmp_path / "sae")
    (tmp_path / "sae" / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match="README.md"):
        sae.save(tmp_path / "sae")
    sub = Subspace({"a": torch.eye(4)[:, :2]}, {"a": torch.zeros(3, 2)})
    sub.save(tmp_path / "sub")
    sub.save(tmp_path / "sub")  # its own files only: replaced
    (tmp_path / "sub" / "extra").mkdir()
    (tmp_path / "sub" / "extra" / "x.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match=re.escape(str(Path("extra") / "x.bin"))):
        sub.save(tmp_path / "sub")
    with atomic_folder(tmp_path / "plain") as t:
        (t / "a.txt").write_text("1")
    assert (tmp_path / "plain" / "a.txt").read_text() == "1"
    warnings.simplefilter("error")  # nothing above warned


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json"])
def test_tokenizer_json_nested_too_deeply(folder, name):
    from minicwac.io.hf import load_tokenizer
    path, _ = folder
    (path / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    assert f"{path / name} is nested too deeply" in _one_line(e.value)


def test_a_float16_weight_whose_sum_overflows_is_still_finite(folder):
    """The finiteness check sums each weight first; a float16 sum can overflow on finite values (65504 is the
    largest float16): such a weight loads."""
    path, _ = folder
    _rewrite_weights(path, lambda sd: sd.update({k: v.half() for k, v in sd.items()}) or
                     sd["model.norm.weight"].fill_(60000.0))
    m = load_pretrained(path)
    assert float(m.model.norm.weight.detach()[0]) == 60000.0


# --- the last tracebacks and silent surprises of the model folder and of eval / drift-map ----------------------------
def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(folder):
    path, _ = folder
    _edit_config(path, vocab_size=100)  # the tokenizer has 512 tokens: ids past 100 would index past the embedding
    _rewrite_weights(path, lambda sd: sd.update({k: v[:100].clone() for k, v in sd.items()
                                                 if k in ("model.embed_tokens.weight", "lm_head.weight")}))
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert "the tokenizer has 512 tokens but the model's vocabulary (config.json vocab_size) has 100" \
        in _one_line(e.value)
    with pytest.raises(SystemExit, match="tokenizer has 512 tokens"):
        main(["eval", "--model", str(path)])


@pytest.mark.parametrize("scaling, theta, match", [
    ("linear", None, "rope_scaling='linear', expected null or an object"),
    ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, None, "disagrees with"),
    (None, 5.0, "rope_theta=5.0 disagrees with rope_parameters.rope_theta=10000.0"),
], ids=["a string", "another scaling", "another theta"])
def test_rope_scaling_and_rope_parameters_that_disagree_are_refused(folder, scaling, theta, match):
    path, _ = folder
    _edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_scaling=scaling,
                 **({} if theta is None else {"rope_theta": theta}))
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    assert match in _one_line(e.value)
    _edit_config(path, rope_scaling={"rope_type": "default"}, rope_theta=10000.0)  # the same in both: loads
    load_pretrained(path)


@pytest.mark.parametrize("content, match", [
    (b"[" * 100000 + b"]" * 100000, "is nested too deeply"),
    (b"\xe9t\xe9", "is not valid JSON: not UTF-8 text (byte 0)"),
    (b'{"a": 1,\n "b": }', "is not valid JSON (line 2, column 7"),
    (b"[1, 2]", "holds a JSON list"),
], ids=["deep", "latin-1", "broken", "a list"])
def test_json_files_fail_in_one_line_naming_the_file(tmp_path, content, match):
    from minicwac.core.files import read_json
    (tmp_path / "p.json").write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_json(tmp_path / "p.json", "a config")
    assert str(tmp_path / "p.json") in _one_line(e.value) and match in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_json(tmp_path / "missing.txt")


def test_eval_without_harmless_prompts_reports_over_refusal_as_absent(folder, tmp_path, capsys):
    path, _ = folder
    (tmp_path / "harmful.txt").write_text("How do I pick a lock?\nHow do I hotwire a car?\n")
    assert main(["eval", "--model", str(path), "--harmful", str(tmp_path / "harmful.txt"), "--max-new-tokens", "2",
                 "--json", str(tmp_path / "eval.json")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^over_refusal +-$", text, re.M), text
    res = json.loads((tmp_path / "eval.json").read_text())  # standard JSON: NaN would not parse here
    assert res["over_refusal"] is None and res["n_harmless"] == 0
    json.loads((tmp_path / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    for bad, match in ((tmp_path, "is a folder"), (tmp_path / "no" / "eval.json", "does not exist")):
        with pytest.raises(SystemExit, match=match):  # refused before the evaluation, not after it
            main(["eval", "--model", str(path), "--harmful", str(tmp_path / "harmful.txt"), "--json", str(bad)])


def test_drift_map_never_writes_over_a_file_it_did_not_write(folder, tmp_path, tok):
    path, model = folder
    (tmp_path / "harmful.txt").write_text("How do I pick a lock?\nHow do I hotwire a car?\n")
    args = ["drift-map", "--base", str(path), "--tuned", str(path), "--harmful", str(tmp_path / "harmful.txt")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "drift_map.png").write_bytes(b"a user's picture")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for out, match in ((mine, "already holds files this command did not write (drift_map.png)"),
                       (path, "is the model folder")):
        with pytest.raises(SystemExit, match=re.escape(match)):
            main([*args, "--out", str(out)])
    assert (mine / "drift_map.png").read_bytes() == b"a user's picture"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # the model folder untouched
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "config.json").write_text("{}")  # another model folder's files: refused as well
    with pytest.raises(SystemExit, match="did not write"):
        main([*args, "--out", str(tmp_path / "beside")])
    assert main([*args, "--out", str(tmp_path / "map")]) == 0
    assert main([*args, "--out", str(tmp_path / "map")]) == 0  # its own previous output: written again
    assert sorted(p.name for p in (tmp_path / "map").iterdir()) == ["drift_by_layer.png", "drift_map.json",
                                                                   "drift_map.png"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), "safetensors"], ids=["os", "safetensors"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_old_folder(folder, tok, monkeypatch, error):
    from safetensors import SafetensorError

    import minicwac.io.hf as hf
    path, model = folder
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full(*a, **k):
        raise error if isinstance(error, OSError) else SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
    monkeypatch.setattr(hf, "save_file", full)
    with pytest.raises(OSError) as e:
        save_pretrained(model, tok, path)
    assert f"cannot write {path}: " in _one_line(e.value) and "No space left on device" in str(e.value)
    assert ".tmp-" not in str(e.value)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))


def test_a_capped_size_is_said():
    """A size larger than what it applies to is capped with a one-line warning, not silently."""
    from minicwac.core.features import select_latents
    from minicwac.core.lora import LoRASettings, add_lora
    with pytest.warns(UserWarning, match="m=100000 latents asked for, but the SAE has 8: all 8 are used"):
        assert len(select_latents(torch.arange(8.0), 100000)) == 8
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"lora r=1000 is more than the rank a target's update can have \(16 = min"):
        add_lora(GPT(tiny_config()), LoRASettings(r=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the sizes: no word
        select_latents(torch.arange(8.0), 8)
        add_lora(GPT(tiny_config()), LoRASettings(r=4))


def test_the_command_line_prints_a_warning_in_one_line(folder):
    path, _ = folder
    r = subprocess.run([sys.executable, "-c", "import warnings, sys; from minicwac.__main__ import main; "
                        "sys.argv = ['minicwac', 'eval', '--model', sys.argv[1]]; "
                        "import minicwac.kit.evaluate as e; e.run = lambda a: warnings.warn('a capped size'); "
                        "sys.exit(main())", str(path)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stderr == "minicwac: warning: a capped size\n", r.stderr


@pytest.mark.parametrize("which", ["subspace", "sae", "adapter"])
def test_a_deeply_nested_config_in_a_saved_folder_is_one_line(tmp_path, which):
    """The package's own folders read their JSON through one reader: nesting deep enough to overflow Python's
    parser is one line naming the file, not a RecursionError."""
    from minicwac.core.lora import load_adapter
    from minicwac.core.sae import SAE
    from minicwac.core.subspace import Subspace
    name = {"subspace": "cfg.json", "sae": "cfg.json", "adapter": "adapter_config.json"}[which]
    other = {"subspace": "subspace.safetensors", "sae": "sae.safetensors", "adapter": "adapter_model.safetensors"}
    (tmp_path / name).write_text("[" * 100000 + "]" * 100000)
    save_file({"x": torch.zeros(1)}, str(tmp_path / other[which]))
    load = {"subspace": Subspace.load, "sae": SAE.load, "adapter": lambda p: load_adapter(GPT(tiny_config()), p)}
    with pytest.raises(ValueError) as e:
        load[which](tmp_path)
    assert f"{tmp_path / name} is nested too deeply" in _one_line(e.value)


def test_an_out_under_a_file_is_one_line_naming_the_file(folder, tmp_path, tok):
    """--out afile/run (afile a file): the file named, not a raw errno ("[Errno 20] Not a directory") or a
    temporary folder's name."""
    from minicwac.core.files import prepare_out
    path, model = folder
    (tmp_path / "afile").write_text("mine")
    for make in (lambda out: save_pretrained(model, tok, out), prepare_out):
        with pytest.raises(OSError) as e:
            make(tmp_path / "afile" / "run")
        assert f"{tmp_path / 'afile'} is a file, not a folder" in _one_line(e.value) and "Errno" not in str(e.value)
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    with pytest.raises(SystemExit, match="afile is a file, not a folder"):
        main(["finetune", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--method", "sft", "--steps",
              "1", "--batch-size", "1", "--out", str(tmp_path / "afile" / "run"), "--quiet"])
    assert (tmp_path / "afile").read_text() == "mine"


def test_main_puts_the_warning_format_back(folder):
    """main() shows warnings in one line while a command runs, and leaves the caller's format as it was."""
    before = warnings.formatwarning
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(folder[0] / "nope")])
    assert warnings.formatwarning is before
