"""The notebooks: their committed outputs follow from their code, they teach (objectives, exercises with hidden
answers, a checked stub, references), and they run top to bottom in a real Jupyter kernel.

Fast tier: every code cell's source matches the digest recorded when its outputs were made (`make notebooks`
records it); the teaching parts are there; each exercise's reference solution passes its check. Full tier:
each notebook is re-executed on a copy (the committed outputs are not touched) and the figures its
`key-figures` cell prints are compared with the committed ones. Both checks are shown to fail on a stale copy.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import tokenize
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is a test dependency (requirements-test.txt)")
pytest.importorskip("nbclient", reason="nbclient is a test dependency (requirements-test.txt)")

import run_notebooks as rn  # noqa: E402  (tests/ is on the path: it holds conftest.py)

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
PAPER = "2604.12384"


def read(path: Path):
    return nbformat.read(path, as_version=4)


def tagged(nb, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 10, f"expected the notebooks 01-10, found {[p.name for p in NOTEBOOKS]}"


# ---------------------------------------------------------------- outputs follow the code (fast)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_outputs_follow_the_code(path: Path):
    stale = rn.stale_cells(read(path))
    assert not stale, (f"{path.name}: code cells {stale} changed since their outputs were recorded (or never ran): "
                       "re-execute with `make notebooks`")


def test_a_stale_copy_is_caught():
    nb = read(NOTEBOOKS[0])
    assert rn.stale_cells(nb) == []
    edited = copy.deepcopy(nb)
    i = next(i for i, c in enumerate(edited.cells) if c.cell_type == "code")
    edited.cells[i].source += "\nx = 1"
    assert rn.stale_cells(edited) == [i + 1]
    added = copy.deepcopy(nb)
    added.cells.append(nbformat.v4.new_code_cell("print('not run')"))
    assert rn.stale_cells(added) == [len(added.cells)]


# ---------------------------------------------------------------- the notebooks teach (fast)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_notebook_teaches(path: Path):
    nb = read(path)
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    text = "\n".join(md)
    head = next((s for s in md if "Learning objectives" in s), None)
    assert head, f"{path.name}: no 'Learning objectives' at the top"
    items = [ln for ln in head.split("Learning objectives", 1)[1].splitlines() if re.match(r"\s*([-*]|\d+\.)\s", ln)]
    assert 3 <= len(items) <= 5, f"{path.name}: {len(items)} learning objectives, expected 3-5"
    n_ex = len(re.findall(r"\*\*Exercise \d+", text))
    assert 2 <= n_ex <= 4, f"{path.name}: {n_ex} exercises ('**Exercise N'), expected 2-4"
    assert text.count("<details>") >= n_ex, f"{path.name}: every exercise needs its answer in a <details> block"
    assert PAPER in text, f"{path.name}: cite the paper (arXiv {PAPER}) in its references"
    assert tagged(nb, rn.FIGURES_TAG), f"{path.name}: no summary cell tagged {rn.FIGURES_TAG!r}"
    assert rn.key_figures_of(nb), f"{path.name}: its key-figures cell printed no `name = value` line"
    assert tagged(nb, "exercise") and tagged(nb, "check") and tagged(nb, "solution"), \
        f"{path.name}: needs a stub (tag 'exercise'), a check cell ('check') and a solution block ('solution')"


JUDGE = "refusal matcher"  # the default judge's name (minicwac.core.evals.REFUSAL_MATCHER)
PLOT_CALL = re.compile(r"set_[xy]?label|set_title|set_[xy]?ticks|label=")


def plain_hs_in_plots(source: str) -> bool:
    """Whether a plot's label, title or ticks is a plain (not f-) string that says HS: no judge named there."""
    code = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines())  # magics
    for t in tokenize.generate_tokens(io.StringIO(code).readline):
        prefix = t.string[:t.string.find(t.string[-1])].lower() if t.type == tokenize.STRING else ""
        if t.type == tokenize.STRING and "f" not in prefix and re.search(r"\bHS\b", t.string) \
                and PLOT_CALL.search(t.line):
            return True
    return False


def hs_unnamed(nb) -> list[str]:
    """Code cells whose printed output shows HS without naming its judge, or whose plot labels HS in a plain
    string; [] when every HS a reader sees says which judge made it."""
    bad = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
        if re.search(r"\bHS\b", text) and JUDGE not in text:
            bad.append(f"cell {i + 1} prints HS without its judge")
        if plain_hs_in_plots(cell.source):
            bad.append(f"cell {i + 1} labels a plot HS without its judge")
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_hs_names_its_judge(path: Path):
    assert hs_unnamed(read(path)) == [], f"{path.name}: HS shown without its judge (use evals.hs_label())"


def test_an_unnamed_hs_is_caught():
    printed = nbformat.v4.new_code_cell("print('HS 5.0')")
    printed.outputs = [nbformat.v4.new_output("stream", name="stdout", text="HS 5.0\n")]
    plotted = nbformat.v4.new_code_cell('ax.set_ylabel("HS %")')
    named = nbformat.v4.new_code_cell('ax.set_ylabel(f"{HS} %"); print(HS)')
    named.outputs = [nbformat.v4.new_output("stream", name="stdout", text="HS (refusal matcher)\n")]
    nb = nbformat.v4.new_notebook(cells=[printed, plotted, named])
    assert hs_unnamed(nb) == ["cell 1 prints HS without its judge", "cell 2 labels a plot HS without its judge"]


def exercises(nb) -> list[tuple[str, str, str]]:
    """(stub source, check source, solution code) for every check cell: the stub before it, the solution after."""
    out = []
    stubs, solutions = tagged(nb, "exercise"), tagged(nb, "solution")
    for c in tagged(nb, "check"):
        stub = max(i for i in stubs if i < c)
        sol = min(i for i in solutions if i > c)
        code = re.search(r"```python\n(.*?)```", nb.cells[sol].source, re.S)
        assert code, f"solution cell {sol + 1} has no ```python block"
        out.append((nb.cells[stub].source, nb.cells[c].source, code.group(1)))
    return out


def run_check(code: str, check: str) -> str:
    ns: dict = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<exercise>", "exec"), ns)  # noqa: S102 - the notebooks' own code
        exec(compile(check, "<check>", "exec"), ns)  # noqa: S102
    return buf.getvalue()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_exercise_solutions_pass_their_checks(path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(FOLDER))  # the notebooks import their helpers (notebooks/course) from there
    monkeypatch.chdir(FOLDER)  # and run in their own folder
    found = exercises(read(path))
    assert found, f"{path.name}: no exercise with a check"
    for stub, check, solution in found:
        assert "not done yet" in run_check(stub, check), f"{path.name}: the stub should pass as 'not done yet'"
        assert "correct" in run_check(solution, check), f"{path.name}: the reference solution fails its check"


# ---------------------------------------------------------------- key figures, re-executed (full tier)


@pytest.mark.slow
def test_changed_figures_are_caught(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 6 * 7"),
                nbformat.v4.new_code_cell("print('key figures')\nprint(f'  answer = {x}')",
                                          metadata={"tags": [rn.FIGURES_TAG]})]
    rn.execute(nb, tmp_path)
    assert rn.stale_cells(nb) == [] and rn.key_figures_of(nb) == {"answer": "42"}
    stale = copy.deepcopy(nb)
    stale.cells[1].outputs[0]["text"] = "key figures\n  answer = 41\n"  # what an older version printed
    fresh = copy.deepcopy(stale)
    rn.execute(fresh, tmp_path)
    assert rn.compare_key_figures(rn.key_figures_of(stale), rn.key_figures_of(fresh)) == \
        ["answer: committed 41, now 42"]


def test_figure_comparison():
    assert rn.compare_key_figures({"a": "33.7", "b": "x"}, {"a": "33.7", "b": "x"}) == []
    assert rn.compare_key_figures({"a": "1000"}, {"a": "1002"}) == ["a: committed 1000, now 1002"]
    assert rn.compare_key_figures({"a": "0.1234"}, {"a": "0.1235"}) == []  # one unit in the 4th digit
    assert rn.compare_key_figures({"a": "1"}, {"b": "1"}) == ["a: committed 1, not printed now",
                                                              "b: printed now (1), not in the committed outputs"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_reruns_to_its_figures(path: Path):
    committed = read(path)
    nb = copy.deepcopy(committed)
    try:
        rn.execute(nb, path.parent)
    except RuntimeError as e:
        pytest.fail(f"{path.name}: {e}")
    diff = rn.compare_key_figures(rn.key_figures_of(committed), rn.key_figures_of(nb))
    assert not diff, f"{path.name}: re-executed, its key figures differ from the committed ones:\n" + "\n".join(diff)
