"""Helpers the notebooks share: the key-figures summary and the exercise checks.

Not part of the package: these are the course's scaffolding. Each notebook ends with `key_figures({...})`, the
figures its text cites; `make test` checks that the committed outputs were made by the committed code cells, and
`make test-all` re-runs every notebook and compares these figures with the committed ones. Each notebook's
exercise checks live in `course/nbNN.py`; `check(check_fn, your_fn)` runs one on the learner's function.
"""
from __future__ import annotations

import math

HEADER = "key figures"


def key_figures(figures: dict[str, float | int | str]) -> None:
    """Print `name = value` per figure under a `key figures` line; numbers with 4 significant digits."""
    print(HEADER)
    for name, value in figures.items():
        if "=" in name or "\n" in name:
            raise ValueError(f"key figure name {name!r}: expected no '=' and no newline")
        # a finite float with 4 significant digits; ints, text, NaN as they are
        text = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        print(f"  {name} = {text}")


def check(check_fn, fn) -> bool:
    """Run an exercise's check on your function: False (and a hint) while it is still the stub, True when it
    passes; a wrong answer raises AssertionError with what differs."""
    try:
        check_fn(fn)
    except NotImplementedError:
        print(f"not done yet: fill in `{getattr(fn, '__name__', 'your function')}` above, then re-run this cell "
              "(the answer is in the <details> block below)")
        return False
    print("correct: your function agrees with the package")
    return True
