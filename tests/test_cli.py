"""`python -m minicwac`: every user error exits non-zero with exactly one `minicwac: error:` line on stderr.

The required cases run the real command in a subprocess (the full tier: `slow`, a torch import each); further
cases call `main()` in-process (same code, without paying a torch import per case: the fast tier)."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from minicwac.io.hf import save_pretrained
from minicwac.io.model import GPT

from conftest import main_error, tiny_config


def run_cli(args, cwd, timeout=120):
    """Run the CLI in a subprocess (one thread, model cache inside the test's folder)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINICWAC_CACHE": str(cwd / "cache"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "minicwac", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(proc, match: str) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("minicwac: error:"), lines[0]
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(tok, tmp_path):
    torch.manual_seed(0)
    return save_pretrained(GPT(tiny_config(vocab_size=tok.vocab_size)), tok, tmp_path / "ckpt")


# --- subprocess: the real command line ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("args, match", [
    (["demo", "--p", "1.5"], "p=1.5 is outside [0, 1]"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--task", "poetry"], "invalid choice: 'poetry'"),
    (["experiment", "--methods", "magic"], "invalid choice: 'magic'"),
    (["experiment", "--preset", "huge"], "invalid choice: 'huge'"),
    (["experiment", "--steps", "0"], "0 must be >= 1"),
    (["bench", "--what", "everything"], "invalid choice: 'everything'"),
    (["fetch", "llama-70b"], "invalid choice: 'llama-70b'"),
    (["fetch", "advbench", "--dtype", "fp32"], "--dtype applies to models only"),
])
def test_argument_errors(tmp_path, args, match):
    """Bad arguments fail before any work starts: nothing is printed on stdout, nothing is written."""
    proc = run_cli(args, tmp_path)
    assert_one_error_line(proc, match)
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unwritable_output_folder(tmp_path):
    """An output folder below a regular file is reported before any training starts."""
    (tmp_path / "afile").write_text("x")
    proc = run_cli(["demo", "--out", "afile/demo", "--quiet"], tmp_path)
    line = assert_one_error_line(proc, "not writable")
    assert "afile/demo" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no cache, no training


@pytest.mark.slow
def test_eval_missing_folder(tmp_path):
    proc = run_cli(["eval", "--model", str(tmp_path / "nope")], tmp_path)
    assert_one_error_line(proc, "does not exist")


@pytest.mark.slow
def test_eval_corrupt_folder(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{oops")
    proc = run_cli(["eval", "--model", str(ckpt)], tmp_path)
    assert_one_error_line(proc, "not valid JSON")


# --- in-process: more cases of the same error handling -----------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["demo", "--p", "0", "abc"], "p='abc' is not a number"),
    (["demo", "--p", "-0.5"], "outside [0, 1]"),
    (["demo", "--seed", "x"], "invalid int value"),
    ([], "required"),
    (["train"], "invalid choice: 'train'"),
    (["eval"], "--model"),
    (["eval", "--model", "m", "--task", "poetry"], "invalid choice: 'poetry'"),
    (["experiment", "--p", "2"], "outside [0, 1]"),
    (["experiment", "--steps", "ten"], "'ten' is not an integer"),
    (["experiment", "--lam", "-1"], "-1.0 must be >= 0"),
    (["experiment", "--lam", "nan"], "nan must be >= 0"),
    (["experiment", "--lam", "big"], "'big' is not a number"),
    (["experiment", "--m", "0"], "0 must be >= 1"),
    (["experiment", "--m", "all"], "'all' is not an integer"),
    (["experiment", "--sae-layer", "0"], "0 must be >= 1"),
    (["experiment", "--safeinstr-frac", "1"], "1.0 must be in [0, 1)"),
    (["experiment", "--asft-lam", "-3"], "-3.0 must be >= 0"),
    (["select"], "the following arguments are required: --grid"),
    (["select", "--grid", "missing.txt"], "missing.txt is missing (or not a file); expected a candidate grid"),
    (["select", "--grid", "docs/results/select-grid-toy.json", "--jobs", "0"], "0 must be >= 1"),
    (["merge", "--out", "x"], "the following arguments are required: DIR"),
    (["merge", "nowhere", "--out", "x"], "nowhere/results.json not found; expected a folder written by experiment"),
    (["real", "--model", "m", "--lam", "-0.5"], "-0.5 must be >= 0"),
    (["real", "--model", "m", "--m", "x"], "'x' is not an integer"),
    (["bench"], "--what"),
    (["bench", "--what", "model", "--m", "50"], "--m, --sae-layer and --fsdp apply to --what step only"),
    (["bench", "--what", "step", "--fsdp", "--device", "cuda"], "starts its CPU processes itself"),
    (["plan", "--shape", "llama-8b", "--gpus", "0"], "gpus=0, expected an integer >= 1"),
    (["bench", "--what", "sharded"], "start it with torchrun"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--method", "sft", "--save-adapter"], "need --lora-r"),
    (["bench", "--what", "step", "--m", "5000"], "m=5000 latents, expected 1..1024"),
    (["bench", "--what", "step", "--sae-layer", "5"], "sae_layer=5, expected 1..4"),
    (["fetch"], "required: target"),
    (["fetch", "smollm2"], "invalid choice: 'smollm2'"),
    (["fetch", "smollm2-135m-instruct", "--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["fetch", "harmbench", "--dtype", "bf16"], "--dtype applies to models only"),
    (["fetch", "advbench", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_errors_in_process(argv, match):
    assert match in main_error(argv)


@pytest.mark.parametrize("corruption, match", [
    ("weights", "not a readable safetensors file"),
    ("tokenizer", "no end token; expected eos_token in tokenizer_config.json"),
    ("shape", "has shape"),
    ("model_type", "is not supported"),
])
def test_eval_corrupt_folder_in_process(ckpt, corruption, match):
    if corruption == "weights":
        (ckpt / "model.safetensors").write_bytes(random.Random(0).randbytes(500))
    elif corruption == "tokenizer":
        (ckpt / "tokenizer_config.json").unlink()
    elif corruption == "shape":
        (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace('"hidden_size": 32',
                                                                                     '"hidden_size": 16'))
    else:
        (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace('"llama"', '"mixtral"'))
    assert match in main_error(["eval", "--model", str(ckpt)])


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_error(tmp_path, monkeypatch, rank, printed):
    """Every rank exits non-zero; only rank 0 says why (N ranks would print N copies of the same line)."""
    from minicwac.__main__ import main
    monkeypatch.setenv("RANK", rank)
    for argv in (["eval", "--model", str(tmp_path / "nope")], ["eval", "--max-new-tokens", "0", "--model", "m"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        if printed:
            assert str(e.value.code).startswith("minicwac: error:") and "\n" not in str(e.value.code)
        else:
            assert e.value.code == 1
