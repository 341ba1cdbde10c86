"""Execute notebooks in place and save them with their outputs.

    python tests/run_notebooks.py notebooks/*.ipynb

Each notebook runs with the `python3` kernel, its own folder as the working directory and a 900 s limit per
cell. On the first error the script stops, prints which notebook and which cell failed (and the error), and
exits with status 1; the failing notebook is saved too, so its outputs show where it stopped.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

CELL_TIMEOUT_S = 900
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in IPython tracebacks


def run_notebook(path: Path, timeout: int = CELL_TIMEOUT_S, kernel: str = "python3") -> float:
    """Execute `path` in place; returns the wall time in seconds. Raises RuntimeError naming the failing cell."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    current = {"index": None}

    def on_cell_start(cell, cell_index, **_):  # nbclient >= 0.6 calls this hook before each cell
        current["index"] = cell_index

    client.on_cell_start = on_cell_start
    t0 = time.time()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        idx = current["index"]
        src = nb.cells[idx].source.strip().splitlines() if idx is not None else []
        first = src[0] if src else ""
        kind = type(e).__name__
        msg = ANSI.sub("", str(e)).strip().splitlines()
        tail = "\n".join(msg[-15:])  # the end of the traceback holds the error itself
        where = f"cell {idx + 1} of {len(nb.cells)}" if idx is not None else "before the first cell"
        raise RuntimeError(f"{where} (code starting {first!r}) failed with {kind}:\n{tail}") from None
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
