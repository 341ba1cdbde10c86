"""A one-figure schematic of CWAC, drawn with matplotlib: calibration on harmful prompts gives (a) the safety
subspace S of every target linear and (b) the SAE's safety latents with their baseline z0; then one fine-tuning
step uses both. Notebook 07 draws it and saves `docs/cwac_method.png`, the README's picture."""
from __future__ import annotations

# colours: calibration (grey), weight side (blue), activation side (orange), the fine-tuning step (green)
GREY, BLUE, ORANGE, GREEN = ("#eeeeee", "#555555"), ("#dbe8f6", "#2f6db3"), ("#fbe5cf", "#c76a12"), \
    ("#e3f2e1", "#2e7d32")

STEPS = (  # (label, colour): the CWAC step of `core/cwac.py`, top to bottom
    ("loss = CE(task batch)\n+ λ · L_safety(harmful batch)", ORANGE),
    ("backward", GREEN),
    ("project g:   g ← g − g S Sᵀ", BLUE),
    ("clip ‖g‖ to 1", GREEN),
    ("AdamW step", GREEN),
    ("project W:   W ← W − (W S − W0 S) Sᵀ", BLUE),
)


def _box(ax, x, y, w, h, colours, title, lines=(), size=9.5):
    """A rounded box with its lower-left corner at (x, y), a bold title and lines of text under it."""
    from matplotlib.patches import FancyBboxPatch

    face, edge = colours
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", fc=face, ec=edge, lw=1.3))
    text = "\n".join(lines)
    if not lines:  # a one-line box: its title centred
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=size, fontweight="bold")
        return
    ax.text(x + 0.12, y + h - 0.1, title, ha="left", va="top", fontsize=size, fontweight="bold", color=edge)
    ax.text(x + 0.12, y + h - 0.42, text, ha="left", va="top", fontsize=size - 1, linespacing=1.35)


def _arrow(ax, start, end, colour="#444444"):
    """A straight arrow from `start` to `end`."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.3, shrinkA=2, shrinkB=2))


def draw_method():
    """The method in one picture (10 x 4 inches): aligned model -> harmful calibration prompts -> (a) the safety
    subspace S of every target linear (its inputs' covariance, the top eigenvectors, W0 S kept) and (b) the SAE's
    safety latents and their baseline z0 -> one fine-tuning step (loss, backward, project g, clip, AdamW,
    project W). Returns a matplotlib Figure made outside pyplot (no backend is switched)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))  # one unit = one inch
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4)
    ax.axis("off")
    note = dict(fontsize=9, style="italic", color="#555555", ha="center", va="center")

    # once, on the aligned model: the calibration
    ax.text(2.5, 3.85, "once, before fine-tuning: calibration", **note)
    _box(ax, 0.1, 2.75, 1.4, 0.8, GREY, "aligned\nmodel  W0")
    _box(ax, 0.1, 1.05, 1.4, 1.05, GREY, "harmful\n(calibration)\nprompts")
    _arrow(ax, (0.8, 2.75), (0.8, 2.1))
    ax.text(0.88, 2.42, "reads", ha="left", va="center", fontsize=8, style="italic", color="#444444")
    mid_x, mid_w = 1.9, 3.05
    _box(ax, mid_x, 2.2, mid_w, 1.42, ORANGE, "activation side: safety latents",
         ["TopK SAE on the residual stream at one", "layer; the latents that fire on harmful",
          "prompts; their aligned values z0;", "L_safety = mean over tokens of ‖z − z0‖²"])
    _box(ax, mid_x, 0.4, mid_w, 1.5, BLUE, "weight side: safety subspace S",
         ["per target linear (every down_proj):", "C = XᵀX / n of its inputs X;",
          "S = top-k eigenvectors of C (99% energy);", "keep S and W0 S"])
    _arrow(ax, (1.5, 1.85), (mid_x, 2.75))
    _arrow(ax, (1.5, 1.3), (mid_x, 1.0))

    # every fine-tuning step
    x0, w, h1, h, gap, top = 5.6, 3.7, 0.62, 0.38, 0.14, 3.62
    ax.text(x0 + w / 2, 3.85, "every fine-tuning step", **note)
    heights = [h1] + [h] * (len(STEPS) - 1)
    ys, y = [], top
    for hh in heights:
        ys.append(y - hh)
        y -= hh + gap
    for (label, colours), y, hh in zip(STEPS, ys, heights):
        _box(ax, x0, y, w, hh, colours, label, size=9)
    for i in range(len(STEPS) - 1):
        _arrow(ax, (x0 + w / 2, ys[i]), (x0 + w / 2, ys[i + 1] + heights[i + 1]))
    centre = [y + hh / 2 for y, hh in zip(ys, heights)]
    # back to the top with the next batch
    ax.annotate("", xy=(x0 + w, centre[0]), xytext=(x0 + w, centre[-1]),
                arrowprops=dict(arrowstyle="-|>", color="#444444", lw=1.1, shrinkA=1, shrinkB=1,
                                connectionstyle="arc3,rad=0.2"))
    ax.text(x0 + w + 0.08, (centre[0] + centre[-1]) / 2, "next\nbatch", ha="left", va="center", fontsize=8,
            style="italic", color="#444444")

    # what each side hands to the step
    right = mid_x + mid_w
    _arrow(ax, (right, centre[0]), (x0, centre[0]), ORANGE[1])
    ax.text((right + x0) / 2, centre[0] + 0.06, "SAE, z0", ha="center", va="bottom", fontsize=8.5, color=ORANGE[1],
            style="italic")
    _arrow(ax, (right, 1.6), (x0, centre[2]), BLUE[1])
    ax.text((right + x0) / 2 - 0.1, (1.6 + centre[2]) / 2 + 0.08, "S", ha="right", va="bottom", fontsize=8.5,
            color=BLUE[1], style="italic")
    _arrow(ax, (right, 0.65), (x0, centre[-1]), BLUE[1])
    ax.text((right + x0) / 2, (0.65 + centre[-1]) / 2 + 0.06, "S, W0 S", ha="center", va="bottom", fontsize=8.5,
            color=BLUE[1], style="italic")
    ax.text(5.0, 0.13, "After every step (W − W0) S = 0 exactly, on every target;  λ · L_safety pulls the harmful "
            "prompts' latents back towards z0.", ha="center", va="center", fontsize=9, color="#333333")
    return fig
