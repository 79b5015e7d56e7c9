"""Server memory under large images: peak RSS and RSS afterwards against idle, for concurrent chat requests that
each carry many large PNGs (issue 33, item 2).

A server on a tiny random checkpoint with a vision tower (tests/test_vision.py's) runs in its own process; this
script sends `--rounds` rounds of `--concurrent` requests at once, each with `--images` copies of one
SIDE x SIDE RGBA PNG (a gradient, 172 KB at 6300 x 6300), and reads the server's VmRSS and VmHWM (peak) from /proc.
Idle is the RSS after a warm-up request with one such picture.

    PYTHONPATH=. python benchmarks/image_memory.py                       # the issue's load: refused by the pixel bound
    PYTHONPATH=. python benchmarks/image_memory.py --request-pixels 400000000   # the bound lifted: every picture decoded
    PYTHONPATH=. python benchmarks/image_memory.py --side 2828          # eight 8 MP pictures: within the bound
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def gradient_png(side: int) -> bytes:
    from PIL import Image

    x = np.arange(side, dtype=np.uint32)
    a = np.empty((side, side, 4), np.uint8)
    a[..., 0] = (x[None, :] * 255 // side).astype(np.uint8)
    a[..., 1] = (x[:, None] * 255 // side).astype(np.uint8)
    a[..., 2], a[..., 3] = 77, 200
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def serve(model_dir: str, url_file: str, request_pixels: int | None) -> None:
    """The server process: the checkpoint, its vision tower, up to 8 images a request, on a free port."""
    from dgemma.io import checkpoint
    from dgemma import image_files
    from dgemma.engine import Engine
    from dgemma.images import ImageSupport
    from dgemma.server import ServerThread, Serving, build_app
    from dgemma.server import media
    from dgemma.text.tokenizer import Tokenizer

    if request_pixels:  # lifted only in this process, to measure decoding past the bound
        image_files.MAX_REQUEST_PIXELS = media.MAX_REQUEST_PIXELS = request_pixels
    ckpt = checkpoint.load(model_dir, quiet=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=4, max_model_len=1024).start()
    serving = Serving(engine, tokenizer, "vision-test", images=ImageSupport.of(ckpt), max_images=8)
    srv = ServerThread(build_app(serving)).start()
    Path(url_file).write_text(srv.url)
    threading.Event().wait()


def chat(url: str, pictures: list[str]) -> int:
    parts = [{"type": "image_url", "image_url": {"url": p}} for p in pictures] + [{"type": "text", "text": "hi"}]
    body = {"model": "vision-test", "messages": [{"role": "user", "content": parts}], "max_tokens": 4, "seed": 1}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=600).status_code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=6300, help="picture side in pixels (6300: 39.7 MP)")
    p.add_argument("--images", type=int, default=8, help="pictures per request")
    p.add_argument("--concurrent", type=int, default=3, help="requests sent at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--request-pixels", type=int, default=0, help="lift the per-request pixel bound to this")
    p.add_argument("--serve", nargs=2, metavar=("MODEL", "URL_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(*args.serve, args.request_pixels)

    from tests.test_vision import add_image_tokenizer, make_vision_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = add_image_tokenizer(make_vision_checkpoint(Path(tmp) / "ckpt"))
        url_file = Path(tmp) / "url"
        cmd = [sys.executable, __file__, "--serve", str(model), str(url_file), "--request-pixels",
               str(args.request_pixels)]
        server = subprocess.Popen(cmd)
        try:
            while not url_file.exists():
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            run(url_file.read_text(), server.pid, args)
        finally:
            server.terminate()
            server.wait()


def run(url: str, pid: int, args) -> None:
    png = gradient_png(args.side)
    picture = "data:image/png;base64," + base64.b64encode(png).decode()
    print(f"{args.concurrent} concurrent requests x {args.images} RGBA PNGs of {args.side}x{args.side} "
          f"({args.side ** 2 / 1e6:.1f} MP, {len(png) / 1e3:.0f} KB each), {args.rounds} rounds")
    assert chat(url, [picture]) == 200  # warm-up: the tower, the threadpool, the first decode
    time.sleep(1)
    idle = rss(pid)[0]
    print(f"idle RSS after a warm-up request: {idle / 2**20:.0f} MiB")
    results = []
    for r in range(args.rounds):
        codes: list[int] = []
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda: codes.append(chat(url, [picture] * args.images)))
                   for _ in range(args.concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - start
        time.sleep(1)
        now, peak = rss(pid)
        results.append({"round": r + 1, "status": sorted(codes), "seconds": round(took, 1),
                        "peak_mib": round(peak / 2**20), "after_mib": round(now / 2**20),
                        "after_vs_idle": f"{(now - idle) / idle:+.1%}"})
        print(json.dumps(results[-1]))
    print(f"peak over idle: {(rss(pid)[1] - idle) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
