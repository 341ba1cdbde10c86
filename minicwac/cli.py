"""What every command shares: the parser that prints one-line errors, the value checks of the flags, and the flags
made from a settings dataclass (`core.settings`), so that a setting and its default are declared once."""
from __future__ import annotations

import argparse
from dataclasses import fields, replace


def error_exit(message: str) -> SystemExit:
    """A one-line error as this process's exit. Under torchrun every rank exits non-zero but only rank 0 prints
    it: N ranks would otherwise print N copies of the same line."""
    import os
    return SystemExit(f"minicwac: error: {message}" if os.environ.get("RANK", "0") == "0" else 1)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise error_exit(f"{message} (see: python -m {self.prog} --help)")


def _number(s: str, kind=float):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None


def harmful_ratio(s: str) -> float:
    """p: the share of harmful pairs in the fine-tuning data, in [0, 1]."""
    try:
        p = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"p={s!r} is not a number") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"p={p} is outside [0, 1]")
    return p


def positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def latents(s: str) -> int | str:
    """A number of safety latents, or "firing" (every latent that fires on the harmful prompts)."""
    return s if s == "firing" else positive_int(s)


def nonnegative(s: str) -> float:
    v = _number(s)
    if not v >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


def share(s: str) -> float:
    v = nonnegative(s)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1)")
    return v


def positive_float(s: str) -> float:
    v = _number(s)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number > 0")
    return v


def fraction(s: str) -> float:
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def judge(s: str):
    """--judge module:function: a user's judge(prompts, answers) -> list of bools (True: harmful), loaded now."""
    from .core.evals import load_judge
    try:
        return load_judge(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_judge_flag(parser: argparse.ArgumentParser, what: str = "HS") -> None:
    """--judge, shared by every command that reports HS."""
    parser.add_argument("--judge", type=judge, default=None, metavar="MODULE:FUNCTION",
                        help=f"who calls an answer harmful for {what}: a function judge(prompts, answers) -> list of "
                             "bools in an importable module or in path/to/file.py (default: the refusal matcher)")


# the constraint settings the run commands (`experiment`, `real`) take as flags; the others: the Python API
RUN_FLAGS = ("lam", "m", "sae_layer", "sae_depth", "skip_prefix")
KINDS = {"fraction": fraction, "share": share, "positive_int": positive_int, "positive_float": positive_float,
         "nonnegative": nonnegative, "latents": latents, "int": int, "float": _number}


def add_setting_flags(parser: argparse.ArgumentParser, cls, names=None, preset: str | None = None,
                      base=None) -> None:
    """One flag per field of the settings dataclass `cls` (`--sae-layer` for `sae_layer`), its help and its check
    read from the field. Default: the field's default; with `preset` (e.g. "the preset's") every default is None,
    meaning the value the run's own settings hold, and the help says so; with `base` (an instance of `cls`, e.g.
    `default_settings()`'s) every default is None too and the help shows base's value."""
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        value = f.default if base is None else getattr(base, f.name)
        meta, default = f.metadata, None if preset or base is not None else value
        shown = preset or ("none" if value is None else f"{value:g}" if isinstance(value, float) else value)
        kw = {"default": default, "help": f"{meta['help']} (default: {shown})".replace("%", "%%")}
        if meta["kind"] == "flag":  # absent: None, so that it keeps the value of the settings it is applied to
            kw.update(action="store_true", default=None)
        elif meta["kind"] == "choice":
            kw["choices"] = meta["choices"]
        else:
            kw["type"] = KINDS[meta["kind"]]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def settings_from(args: argparse.Namespace, base):
    """`base` (a settings dataclass) with every field a flag of `args` set (a None or absent flag keeps it)."""
    return replace(base, **{f.name: getattr(args, f.name) for f in fields(base)
                            if getattr(args, f.name, None) is not None})

