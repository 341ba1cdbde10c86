"""Every notebook runs top to bottom in a real Jupyter kernel; any cell error fails the test.

The notebooks are executed on a copy, so the committed outputs are not touched (`make notebooks` refreshes
them). They share the cached base/aligned toy models (runs/cache), which the first one to need them trains.
"""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is a test dependency (requirements-test.txt)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a test dependency (requirements-test.txt)")

pytestmark = pytest.mark.slow  # the full tier only (make test-all)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, f"expected the notebooks 01-03, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{str(e)[-3000:]}")
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    assert n_code > 0, f"{path.name} has no code cells"
