"""The layering the folder tree promises: the core imports no toy world, no experiment, no model class of its
own and no checkpoint IO; the CWAC step (backward, clip, optimizer step, projection) is written once."""
from __future__ import annotations

import ast
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
