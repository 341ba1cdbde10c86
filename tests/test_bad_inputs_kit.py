"""Safety kits that must not load, and calibrations that must not pass without a word: a kit file with a flipped
byte or cut short (refused by the sha256 kit.json records), a kit whose S is zero or scaled, or whose shapes and
latent indices do not fit (refused by the structural checks, even when its digests were written again), and
prompt sets too small, repeated, overlapping or alike (refused, or warned about in report.md and on stderr)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings

import pytest
import torch
from conftest import main_error, tiny_config
from safetensors.torch import load_file, save_file
from test_kit import HARMFUL, HARMLESS

from minicwac.__main__ import main
from minicwac.io.hf import save_pretrained
from minicwac.io.model import GPT
from minicwac.kit import Kit, KitSettings, calibrate

# an SAE good enough for no warning on the tiny model (explained variance ~0.73); BAD_SAE explains ~0.3
GOOD = KitSettings(sae_layer=1, d_sae=64, sae_k=16, sae_steps=100, m=8)
BAD_SAE = KitSettings(sae_layer=1, d_sae=64, sae_k=4, sae_steps=10, m=8)
KIT_FILES = ["kit.json", "features.safetensors", "subspace/subspace.safetensors", "subspace/cfg.json",
             "sae/sae.safetensors", "sae/cfg.json", "report.md", "spectrum.png"]


def tiny_model(tok):
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, max_position_embeddings=128))


@pytest.fixture(scope="module")
def made(tmp_path_factory, tok):
    """One kit of the tiny model, calibrated once: (folder, model). Each test tampers with its own copy."""
    d = tmp_path_factory.mktemp("made")
    model = tiny_model(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sound calibration warns about nothing
        kit = calibrate(model, tok, HARMFUL, HARMLESS, settings=GOOD, progress=False)
    kit.save(d / "kit")
    return d / "kit", model


@pytest.fixture
def kit(made, tmp_path):
    shutil.copytree(made[0], tmp_path / "kit")
    return tmp_path / "kit", made[1]


def refused(path, model, match):
    """Kit.load's error: a ValueError (or FileNotFoundError) in one line matching `match`."""
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        Kit.load(path, model)
    assert "\n" not in str(e.value), str(e.value)


def flip_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle: tensor data in a safetensors file, a value in a JSON one
    f.write_bytes(bytes(data))


def truncate(f):
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def resign(path):
    """Write kit.json's digests again after a change, as a forger (or a tool that rewrites kits) would: written here
    independently of the package, so the structural checks are what must refuse the kit."""
    meta = json.loads((path / "kit.json").read_text())
    meta["files"] = {f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
                     for f in sorted(path.rglob("*")) if f.is_file() and f.relative_to(path).as_posix() != "kit.json"}
    body = {k: v for k, v in meta.items() if k != "sha256"}
    meta["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (path / "kit.json").write_text(json.dumps(meta, indent=2))


def edit(f, change):
    t = load_file(str(f))
    change(t)
    save_file(t, str(f))


def every(key, fn):
    """A change of every tensor whose name ends with `key` (S or W0S of each layer)."""
    return lambda t: t.update({k: fn(v) for k, v in t.items() if k.endswith(key)})


# ---------------------------------------------------------------- the digests: any changed byte, any file

@pytest.mark.parametrize("name", KIT_FILES)
@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped-byte", "truncated"])
def test_a_changed_kit_file_is_refused_naming_it(kit, name, damage):
    path, model = kit
    damage(path / name)
    refused(path, model, f"{name}.*(sha256|not readable|not valid JSON)")


def test_a_value_changed_in_kit_json_is_refused(kit):
    """A one-character edit that keeps kit.json valid JSON (m 8 -> 9): its own digest refuses it."""
    path, model = kit
    text = (path / "kit.json").read_text()
    (path / "kit.json").write_text(text.replace('"m": 8', '"m": 9', 1))
    refused(path, model, r"kit\.json does not match the sha256 it recorded")


def test_a_kit_json_without_its_digests_is_refused(kit):
    """A kit saved with digests (version 2) whose kit.json lost them: not taken for an old kit."""
    path, model = kit
    meta = json.loads((path / "kit.json").read_text())
    del meta["files"], meta["sha256"]
    (path / "kit.json").write_text(json.dumps(meta))
    refused(path, model, r"kit\.json does not match the sha256")


def test_an_old_kit_without_digests_loads_with_a_warning_and_its_structure_checked(kit):
    path, model = kit
    meta = json.loads((path / "kit.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("files", "sha256")} | {"version": 1}
    (path / "kit.json").write_text(json.dumps(meta))
    (path / "report.md").write_text("notes of my own")  # not checked without digests
    with pytest.warns(UserWarning, match="records no sha256 of its files"):
        Kit.load(path, model)
    truncate(path / "features.safetensors")  # the raw SafetensorError: now one line naming the file
    with pytest.warns(UserWarning, match="records no sha256"):
        refused(path, model, r"features\.safetensors is not readable \(SafetensorError")


def test_a_sound_kit_loads_without_a_word(kit):
    path, model = kit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Kit.load(path, model)
    assert loaded.features.m == 8 and loaded.subspace.S


# ---------------------------------------------------------------- the structure, with the digests written again

def scale_first_column(t, f=1.001):
    """Column 0 of S and W0S of the first layer scaled by f: W S = W0 S still holds, S^T S is off by 2(f - 1)."""
    for key in [k for k in t if k.endswith((".weight.S", ".weight.W0S"))][:2]:
        t[key][:, 0] *= f


def drop_last_latent(t):
    t["z0"] = t["z0"][..., :-1].contiguous()


STRUCTURE = [  # (id, file, change, the error it must end in)
    ("S-and-W0S-zeroed", "subspace/subspace.safetensors",
     lambda t: (every(".S", torch.zeros_like)(t), every(".W0S", torch.zeros_like)(t)),
     r"subspace\.safetensors: model\.layers\.0\.mlp\.down_proj: S is not orthonormal \(max \|S\^T S - I\| = 1"),
    ("S-and-W0S-scaled-by-2", "subspace/subspace.safetensors",
     lambda t: (every(".S", lambda v: 2 * v)(t), every(".W0S", lambda v: 2 * v)(t)),
     r"S is not orthonormal \(max \|S\^T S - I\| = 3"),
    # a near miss: 0.1% on one column (W S = W0 S untouched) is 2e-3 off, refused at 1e-4
    ("one-column-1.001x", "subspace/subspace.safetensors", scale_first_column, r"S is not orthonormal .* 0\.002"),
    ("W0S-of-another-k", "subspace/subspace.safetensors",
     every(".W0S", lambda v: v[:, :-1].contiguous()), r"expected float matrices \(in, k\) and \(out, k\)"),
    ("latent-index-past-the-SAE", "features.safetensors", lambda t: t["idx"].__setitem__(0, 64),
     r"features\.safetensors: latent index 64 is outside the SAE's 64 latents \(expected 0\.\.63\)"),
    ("negative-latent-index", "features.safetensors", lambda t: t["idx"].__setitem__(0, -1),
     r"latent index -1 is outside the SAE's 64 latents"),
    ("z0-one-latent-short", "features.safetensors", drop_last_latent,
     r"latent indices idx are \(8,\) torch\.int64; expected 7 integers"),
    ("keep-shorter-than-ids", "features.safetensors", lambda t: t.update(keep=t["keep"][:, :-1].contiguous()),
     r"features\.safetensors: ids \(10, \d+\), keep \(10, \d+\)"),
    ("z0-NaN", "features.safetensors", lambda t: t["z0"].view(-1).__setitem__(0, float("nan")), r"z0 holds NaN"),
]


@pytest.mark.parametrize("name, change, match", [c[1:] for c in STRUCTURE], ids=[c[0] for c in STRUCTURE])
def test_a_kit_whose_structure_is_wrong_is_refused_even_with_fresh_digests(kit, name, change, match):
    path, model = kit
    edit(path / name, change)
    resign(path)
    refused(path, model, match)


def test_a_kit_layer_other_than_its_sae_is_refused(kit):
    path, model = kit
    meta = json.loads((path / "kit.json").read_text())
    (path / "kit.json").write_text(json.dumps({**meta, "layer": 2}))
    resign(path)
    refused(path, model, r"the features read layer 2, their SAE layer 1")


# ---------------------------------------------------------------- degenerate calibrations

def calibrate_tiny(tok, harmful, harmless, settings=BAD_SAE):
    return calibrate(tiny_model(tok), tok, harmful, harmless, settings=settings, progress=False)


@pytest.mark.parametrize("harmful, harmless, match", [
    (HARMFUL[:7], HARMLESS, r"7 harmful prompts \(7 distinct .*\): calibration needs at least 8 distinct"),
    ([HARMFUL[0]] * 20, None, r"20 harmful prompts \(1 distinct .*\): calibration needs at least 8"),
    (HARMFUL[:4] * 5, HARMLESS, r"20 harmful prompts \(4 distinct"),
    # the same prompts as harmless: every contrast score is 0, the selection would be arbitrary
    (HARMFUL, HARMFUL, r"every latent's contrast score \(harmful minus harmless mean\) is 0"),
    # the same set in another order: the scores differ only by rounding, still refused
    (HARMFUL, HARMFUL[::-1], r"every latent's contrast score .* is 0 \(at most"),
], ids=["7-prompts", "20-copies-of-one", "4-distinct-in-20", "harmless-equals-harmful", "harmless-reordered"])
def test_a_degenerate_calibration_is_refused(tok, harmful, harmless, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overlap and SAE warnings on the way are not what is tested here
        with pytest.raises(ValueError, match=match) as e:
            calibrate_tiny(tok, harmful, harmless)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("harmful, harmless, settings, match, line", [
    (HARMFUL + HARMFUL[:4], HARMLESS, GOOD, r"4 of the 14 harmful prompts repeat another .*: 10 distinct",
     "Calibrated on 14 harmful prompts (10 distinct)"),
    (HARMFUL, HARMLESS + HARMFUL[:2], GOOD, r"2 of the 10 distinct harmful prompts are also among the harmless",
     "Calibrated on 10 harmful prompts (8 harmless"),
    (HARMFUL, HARMLESS, BAD_SAE, r"the SAE explains 0\.\d+ of the residual stream's variance .* \(below 0\.5\)",
     "Calibrated on 10 harmful prompts (6 harmless"),
], ids=["repeats", "overlap", "sae-explains-too-little"])
def test_a_doubtful_calibration_warns_on_stderr_and_in_the_report(tok, tmp_path, harmful, harmless, settings, match,
                                                                   line):
    with pytest.warns(UserWarning, match=match):
        kit = calibrate_tiny(tok, harmful, harmless, settings)
    assert len(kit.report["warnings"]) == 1 and re.search(match, kit.report["warnings"][0])
    kit.save(tmp_path / "kit")
    report = (tmp_path / "kit" / "report.md").read_text()
    assert line in report and "## Warnings" in report and kit.report["warnings"][0] in report
    assert json.loads((tmp_path / "kit" / "kit.json").read_text())["report"]["warnings"] == kit.report["warnings"]


def test_cli_calibrate_prints_the_warnings_and_refuses_in_one_line(tok, tmp_path, capsys):
    save_pretrained(tiny_model(tok), tok, tmp_path / "m")
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL + HARMFUL[:3]) + "\n")
    (tmp_path / "few.txt").write_text("\n".join(HARMFUL[:5]) + "\n")
    common = ["calibrate", "--model", str(tmp_path / "m"), "--sae-layer", "1", "--d-sae", "64", "--sae-k", "16",
              "--sae-steps", "100", "--m", "8", "--quiet"]
    msg = main_error([*common, "--harmful", str(tmp_path / "few.txt"), "--out", str(tmp_path / "k0")])
    assert "5 harmful prompts (5 distinct" in msg and not (tmp_path / "k0").exists()
    with pytest.warns(UserWarning, match="3 of the 13 harmful prompts repeat another"):
        assert main([*common, "--harmful", str(tmp_path / "harmful.txt"), "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "Calibrated on 13 harmful prompts (10 distinct)" in out and "- 3 of the 13 harmful prompts repeat" in out


def test_an_sae_k_beyond_the_latents_is_said(tok):
    """--sae-k 1000 --d-sae 8: k is capped at the 8 latents, with a warning (it was capped without a word)."""
    with pytest.warns(UserWarning, match="sae_k=1000 is more than the SAE's 8 latents: k = 8 is used"):
        kit = calibrate_tiny(tok, HARMFUL, HARMLESS, KitSettings(sae_layer=1, d_sae=8, sae_k=1000, sae_steps=5, m=4))
    assert kit.features.sae.cfg.k == 8
