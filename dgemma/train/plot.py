"""The loss curve as a PNG, drawn with matplotlib when it is installed (`pip install dgemma[plot]`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path


def finite_points(history: list[dict], key: str, positive: bool = True) -> list[tuple[int, float]]:
    """(step, value) for each line with a step and a finite `key`, positive unless `positive` is False (the loss
    axis is logarithmic; a solve rate may be 0). NaN, Inf and anything not a number (an edited metrics.jsonl) are
    left out, not plotted or raised on."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    return [(h["step"], float(h[key])) for h in history
            if isinstance(h, dict) and number(h.get("step")) and number(h.get(key)) and (h[key] > 0 or not positive)]


SOLVE_RATE = "eval_solve_rate_"  # the Sudoku evals' metrics, one per difficulty


def rate_label(key: str) -> str:
    """eval_solve_rate_23-36 -> "23-36 givens"; eval_solve_rate_44_pinned -> "44 givens, pinned"."""
    givens, _, mode = key[len(SOLVE_RATE):].partition("_")
    return f"{givens} givens" + (f", {mode}" if mode else "")


def plot_losses(history: list[dict], path: str | Path, quiet: bool = False) -> Path | None:
    """Training loss (and the decoder/encoder parts) against the step; beside it, when the history has them, the
    periodic evals' solve rates. Returns the path, or None with fewer than two finite loss points."""
    if len(finite_points(history, "loss")) < 2:
        return None
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a curve without axes reads as more than it shows: write none, and say why
        if not quiet:
            print("dgemma: matplotlib is not installed (pip install 'dgemma[plot]'), so no loss.png was written; "
                  "the losses are in metrics.jsonl", file=sys.stderr)
        return None
    rates = sorted({k for h in history if isinstance(h, dict) for k in h if k.startswith(SOLVE_RATE)})
    if rates:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for key in rates:
            pts = finite_points(history, key, positive=False)
            if pts:
                right.plot(*zip(*pts), marker="o", label=rate_label(key))
        right.set_xlabel("step")
        right.set_ylabel("solve rate (validation)")
        right.set_ylim(0, 1)
        right.grid(alpha=0.3)
        right.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "loss"), ("dec_loss", "decoder"), ("enc_loss", "encoder")):
        pts = finite_points(history, key)
        if pts:
            ax.plot(*zip(*pts), label=label, linewidth=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".dgemma-tmp-{path.name}.png")  # run_dir.py's temporary-file prefix
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path

