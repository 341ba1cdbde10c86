"""Execute notebooks in place and save them with their outputs.

    python tests/run_notebooks.py notebooks/*.ipynb

Each notebook runs with the `python3` kernel, its own folder as the working directory and a 900 s limit per
cell. On the first error the script stops, prints which notebook and which cell failed (and the error), and
exits with status 1; the failing notebook is saved too, so its outputs show where it stopped.

A clean run records in each code cell's metadata a digest of the source that made its outputs
(`source_digest`). The tests read it back: `make test` fails on a notebook with a code cell changed since its
outputs were recorded (`stale_cells`); `make test-all` re-executes every notebook and compares the figures its
`key-figures` cell prints with the committed ones (`key_figures_of`, `compare_key_figures`).
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

CELL_TIMEOUT_S = 900
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in IPython tracebacks
DIGEST = "source_digest"  # code-cell metadata: the digest of the source its outputs came from
FIGURES_TAG = "key-figures"  # the summary cell whose printed `name = value` lines are compared
# The notebooks pin one thread and every run is seeded, so a re-execution on the same kind of CPU prints the same
# figures bit for bit (checked: two runs of every notebook agree). Figures are printed with 4 significant digits;
# the relative tolerance is one unit in the 4th digit, so that only a value sitting on a rounding boundary is
# absorbed. A CPU with other vector instructions can round matrix products differently, and after a hundred
# training steps that moves a percentage by whole answers: there the check fails, and `make notebooks` re-records.
FIGURES_RTOL = 1e-3


def source_digest(source: str) -> str:
    """A short digest of a code cell's source."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def record_digests(nb) -> None:
    """After a clean run: each code cell remembers the source its outputs came from."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata[DIGEST] = source_digest(cell.source)


def clear_digests(nb) -> None:
    """After a failed run: no cell's outputs can be trusted until the notebook runs through."""
    for cell in nb.cells:
        cell.metadata.pop(DIGEST, None)


def stale_cells(nb) -> list[int]:
    """1-based positions of the code cells whose outputs were not made by their current source (edited since the
    last clean run, added without running, or never run)."""
    return [i + 1 for i, c in enumerate(nb.cells) if c.cell_type == "code" and
            (c.metadata.get(DIGEST) != source_digest(c.source) or c.get("execution_count") is None)]


def key_figures_of(nb) -> dict[str, str]:
    """name -> printed value, from the stdout of the cells tagged `key-figures` (lines `name = value`)."""
    figures = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or FIGURES_TAG not in cell.metadata.get("tags", []):
            continue
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        for line in text.splitlines():
            if " = " in line:
                name, value = line.split(" = ", 1)
                figures[name.strip()] = value.strip()
    return figures


def _same(a: str, b: str, rtol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b  # text figures compare exactly
    if x == y or (x != x and y != y):  # equal, or both NaN
        return True
    return abs(x - y) <= rtol * max(abs(x), abs(y))


def compare_key_figures(committed: dict[str, str], fresh: dict[str, str], rtol: float = FIGURES_RTOL) -> list[str]:
    """One line per figure that differs, is missing from the fresh run, or is new in it; [] when they agree."""
    out = [f"{k}: committed {v}, now {fresh[k]}" for k, v in committed.items() if k in fresh and not _same(v, fresh[k], rtol)]
    out += [f"{k}: committed {v}, not printed now" for k, v in committed.items() if k not in fresh]
    out += [f"{k}: printed now ({v}), not in the committed outputs" for k, v in fresh.items() if k not in committed]
    return out


def execute(nb, folder: Path, timeout: int = CELL_TIMEOUT_S, kernel: str = "python3") -> None:
    """Execute the notebook `nb` (in memory) with `folder` as its working directory and record its digests.
    Raises RuntimeError naming the failing cell (its digests cleared, its outputs up to that cell kept)."""
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(Path(folder).resolve())}})
    current = {"index": None}

    def on_cell_start(cell, cell_index, **_):  # nbclient >= 0.6 calls this hook before each cell
        current["index"] = cell_index

    client.on_cell_start = on_cell_start
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        clear_digests(nb)
        idx = current["index"]
        src = nb.cells[idx].source.strip().splitlines() if idx is not None else []
        first = src[0] if src else ""
        kind = type(e).__name__
        msg = ANSI.sub("", str(e)).strip().splitlines()
        tail = "\n".join(msg[-15:])  # the end of the traceback holds the error itself
        where = f"cell {idx + 1} of {len(nb.cells)}" if idx is not None else "before the first cell"
        raise RuntimeError(f"{where} (code starting {first!r}) failed with {kind}:\n{tail}") from None
    record_digests(nb)


def run_notebook(path: Path, timeout: int = CELL_TIMEOUT_S, kernel: str = "python3") -> float:
    """Execute `path` in place; returns the wall time in seconds. Raises RuntimeError naming the failing cell."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    try:
        execute(nb, path.parent, timeout, kernel)
    finally:
        nbformat.write(nb, path)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="execute notebooks in place and save their outputs")
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell (default 900)")
    ap.add_argument("--kernel", default="python3")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        print(f"run_notebooks: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in args.notebooks:
        print(f"running {path} ...", flush=True)
        try:
            dt = run_notebook(path, args.timeout, args.kernel)
        except RuntimeError as e:  # a cell failed: the message names it
            print(f"FAILED {path}: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - e.g. no such kernel, unreadable notebook
            print(f"FAILED {path}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok      {path} in {dt:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
