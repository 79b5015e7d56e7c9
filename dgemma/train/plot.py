"""The loss curve as a PNG, drawn with matplotlib when it is installed (`pip install dgemma[plot]`)."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path


def plot_losses(history: list[dict], path: str | Path, quiet: bool = False) -> Path | None:
    """Training loss (and the decoder/encoder parts) against the step. Returns the path, or None with no data."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if len(points) < 2:
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
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "loss"), ("dec_loss", "decoder"), ("enc_loss", "encoder")):
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=label, linewidth=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _raster_plot(points: list[tuple[int, float]], path: Path, width: int = 640, height: int = 360) -> Path:
    """A black polyline on white, axes-free; enough to see the trend without matplotlib."""
    pad = 20
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    img = [[255] * width for _ in range(height)]

    def to_px(x, y):
        px = pad + (x - x0) / max(x1 - x0, 1e-12) * (width - 2 * pad)
        py = height - pad - (y - y0) / max(y1 - y0, 1e-12) * (height - 2 * pad)
        return px, py

    prev = to_px(*points[0])
    for p in points[1:]:
        cur = to_px(*p)
        n = int(max(abs(cur[0] - prev[0]), abs(cur[1] - prev[1]), 1))
        for i in range(n + 1):
            x = round(prev[0] + (cur[0] - prev[0]) * i / n)
            y = round(prev[1] + (cur[1] - prev[1]) * i / n)
            img[y][x] = 0
        prev = cur
    raw = b"".join(b"\x00" + bytes(row) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path
