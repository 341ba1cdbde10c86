"""The schematic of the method (`minicwac.tools.schematic`, the README's picture): it draws, it shows every step
of the CWAC step with readable, non-overlapping labels inside the figure, and the committed PNG is there."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402  (Agg: no display needed)

from minicwac.tools.schematic import draw_method  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_schematic_shows_the_method():
    fig = draw_method()
    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = [t for t in fig.axes[0].texts if t.get_text()]
    text = "\n".join(t.get_text() for t in texts)
    for label in ("aligned", "harmful", "safety subspace S", "W0 S", "z0", "L_safety", "backward", "project g",
                  "clip", "AdamW", "project W"):
        assert label in text, f"the schematic has no label {label!r}"
    # the steps in the order `cwac_step` takes them
    order = [text.index(s) for s in ("L_safety(harmful batch)", "backward", "project g", "clip", "AdamW",
                                     "project W")]
    assert order == sorted(order), "the fine-tuning step's boxes are out of order"
    w, h = fig.bbox.width, fig.bbox.height
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    for label, b in boxes:
        assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= w and b.y1 <= h, f"{label!r} runs off the figure"
    overlaps = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]
    assert not overlaps, f"labels overlap: {overlaps}"


def test_the_readme_picture_is_committed():
    png = ROOT / "docs" / "cwac_method.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", \
        "docs/cwac_method.png is missing: notebook 07 draws it (make notebooks)"
    assert "docs/cwac_method.png" in (ROOT / "README.md").read_text()
