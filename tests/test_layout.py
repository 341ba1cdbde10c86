"""The layering the folder tree promises: the core imports no toy world, no experiment, no model class of its
own and no checkpoint IO; the CWAC step (backward, clip, optimizer step, projection) is written once."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "minicwac"


def imports(path: Path) -> list[str]:
    """Modules a file imports at run time (imports under `if TYPE_CHECKING:` are type hints only)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_the_core_imports_only_the_core():
    for f in sorted((PKG / "core").glob("*.py")):
        for mod in imports(f):
            assert not mod.startswith("..") and not mod.startswith("minicwac"), \
                f"minicwac/core/{f.name} imports {mod}: the core may import only itself, torch and the standard library"


def test_importing_the_core_loads_no_toy_world():
    code = "import sys, minicwac.core; print(sorted(m for m in sys.modules if m.startswith('minicwac')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for outer in ("minicwac.toy", "minicwac.tools.real", "minicwac.kit", "minicwac.tools.report", "minicwac.tools.bench"):
        assert f"'{outer}" not in loaded, f"importing minicwac.core loaded {outer}"


def test_the_step_is_written_once():
    """Only core/cwac.py runs backward -> clip -> optimizer step -> projection; everything else calls it."""
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        rel = f.relative_to(PKG).as_posix()
        if rel != "core/cwac.py":
            assert ".project_(model)" not in src or rel == "tools/bench.py", f"{rel} projects weights itself"
            assert "opt.step()" not in src or rel in ("tools/bench.py", "core/sae.py"), f"{rel} has its own optimizer step"
    bench = (PKG / "tools" / "bench.py").read_text()
    assert bench.count("opt.step()") == 1  # transformers' SFT step, the reference the package's step is timed against


# ---------------------------------------------------------------- one settings tree, one method table, no cycles

def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__.py)."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported_modules(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its code (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from . import dist` imports the module dist
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known and m != name}


def test_the_package_has_no_import_cycle():
    known = modules()
    graph = {n: imported_modules(n, p, known) for n, p in known.items()}
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1  # on the current path
        for m in sorted(graph[n]):
            # a package's __init__ re-exporting its own modules is not a cycle of the code
            if m.startswith(n + ".") and known[n].name == "__init__.py":
                continue
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_no_private_name_is_imported_across_modules():
    known = modules()
    bad = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minicwac")):
                bad += [f"{name} imports {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_importing_the_core_loads_only_the_core():
    code = "import sys, minicwac.core; print(sorted(m for m in sys.modules if m.startswith('minicwac')))"
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    outside = [m for m in loaded if m != "minicwac" and not m.startswith("minicwac.core")]
    assert not outside, f"importing minicwac.core loaded {outside}"


def test_plan_help_does_not_import_the_toy_world():
    code = ("import sys, contextlib, io\nfrom minicwac.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['plan', '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('minicwac')))")
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not [m for m in loaded if m.startswith(("minicwac.toy", "minicwac.kit"))], loaded


def dataclass_defaults() -> dict[str, dict[str, list[str]]]:
    """class name -> field name -> the modules whose dataclass of that name declares it with a default."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                for st in node.body:
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None:
                        out.setdefault(node.name, {}).setdefault(st.target.id, []).append(name)
    return out


def test_every_constraint_setting_is_declared_once():
    """KitSettings' and BaselineSettings' fields have their defaults there and in no other dataclass (the toy and
    real-checkpoint runs hold a KitSettings; they never re-declare its fields)."""
    from minicwac.core.settings import BaselineSettings, KitSettings
    decl = dataclass_defaults()
    for cls in (KitSettings, BaselineSettings):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(decl[cls.__name__]) == names, f"{cls.__name__} fields without a default"
        # (seed: each class's own randomness, e.g. the SAE's in KitSettings and the batches' in Schedule)
        again = {(c, f) for c, fs in decl.items() if c != cls.__name__ for f in fs if f in names and f != "seed"}
        assert not again, f"settings of {cls.__name__} declared again in: {sorted(again)}"


def test_the_command_line_offers_the_methods_of_the_table():
    import argparse

    from minicwac.__main__ import COMMANDS
    from minicwac.core.settings import METHODS, methods_for
    from minicwac.tools.plan import PLAN_METHODS

    def choices(cmd: str, flag: str):
        p = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[cmd][0]).add_arguments(p)
        return tuple(next(a for a in p._actions if flag in a.option_strings).choices)

    assert choices("finetune", "--method") == methods_for("kit")
    assert choices("experiment", "--methods") == methods_for("toy") == tuple(METHODS)
    assert choices("real", "--methods") == methods_for("real")
    assert set(PLAN_METHODS) <= set(methods_for("kit"))
    assert set(methods_for("kit")) <= set(methods_for("real")) <= set(methods_for("toy"))


def test_no_function_over_80_lines_and_a_thin_main():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
    assert len((PKG / "__main__.py").read_text().splitlines()) < 80


def test_every_package_folder_is_a_package():
    """A folder of modules without __init__.py would be left out of a (non-editable) install."""
    from setuptools import find_packages
    folders = {str(f.parent.relative_to(PKG.parent)).replace("/", ".") for f in PKG.rglob("*.py")}
    assert folders <= set(find_packages(where=str(PKG.parent), include=["minicwac*"]))
