"""Hardening, second pass (issue 33): image urls that used to be answered 500 are 400s naming the part; a server on
a tiny random checkpoint with a vision tower (test_vision's), local paths allowed."""

from __future__ import annotations

import httpx
import pytest

from .test_vision import _image_chat, cli_ckpt, image_server, pair  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("url, why", [("ok\u0000.png", "NUL"), ("a" * 5000, "longer than the 4096"),
                                      ("x/" * 2100 + "a.png", "longer than the 4096"),
                                      ("b" * 300 + ".png", "File name too long"),
                                      ("file:///ok%00.png", "NUL")])
def test_hostile_local_paths_are_400s_naming_the_part(image_server, url, why):
    srv, _, _ = image_server
    r = httpx.post(srv.url + "/v1/chat/completions", json=_image_chat(url), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and "messages[0].content[0].image_url" in error["message"], error
    assert why in error["message"], error


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_requests_pixels_are_bounded_before_any_is_decoded(image_server):
    """Two 36 MP pictures (each under the 40 MP one picture may hold) are more than a request may send; refused by
    their headers, the server answers at once."""
    import base64

    from PIL import Image

    from dgemma.image_files import MAX_REQUEST_PIXELS

    srv, _, _ = image_server
    big = "data:image/png;base64," + base64.b64encode(_png(Image.new("1", (6000, 6000)))).decode()
    assert 6000 * 6000 <= MAX_REQUEST_PIXELS < 2 * 6000 * 6000
    r = httpx.post(srv.url + "/v1/chat/completions",
                   json=_image_chat(big, {"type": "image_url", "image_url": {"url": big}}), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and "72,000,000 pixels" in error["message"], error


def test_decodes_wait_for_a_slot(tmp_path):
    """While every decode slot is taken, a picture waits (counted as waiting, not decoding) and is decoded once a
    slot is free."""
    import threading

    from PIL import Image

    from dgemma.image_files import DECODE_SLOTS, open_image
    from dgemma.images import ImageProcessorConfig, preprocess

    picture = open_image(_png(Image.new("RGB", (64, 48), (10, 20, 30))))
    cfg = ImageProcessorConfig(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    held = [DECODE_SLOTS.__enter__() for _ in range(DECODE_SLOTS.n)]
    out = []
    worker = threading.Thread(target=lambda: out.append(preprocess(picture, cfg)))
    try:
        worker.start()
        for _ in range(6000):  # until it waits (there is nothing else it can do)
            if DECODE_SLOTS.waiting:
                break
            threading.Event().wait(0.005)
        assert DECODE_SLOTS.waiting == 1 and DECODE_SLOTS.decoding == DECODE_SLOTS.n and not out
    finally:
        for slot in held:
            slot.__exit__(None, None, None)
    worker.join(60)
    assert len(out) == 1 and out[0].num_soft_tokens > 0
    assert DECODE_SLOTS.waiting == 0 and DECODE_SLOTS.decoding == 0


def test_transparency_composited_in_bands_equals_the_whole_composite():
    """A picture wider than one band: the banded composite onto white is the reference's whole-image one."""
    import numpy as np
    from PIL import Image

    from dgemma.image_files import COMPOSITE_BAND_PIXELS, decode_image

    rng = np.random.default_rng(0)
    w, h = 1500, 3 * COMPOSITE_BAND_PIXELS // 1500 + 7  # three bands and a bit
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    want = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")
    got = decode_image(_png(rgba))
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))
    la = rgba.convert("LA")  # another mode with transparency goes through RGBA first, as the reference does
    want = Image.alpha_composite(Image.new("RGBA", la.size, (255, 255, 255)), la.convert("RGBA")).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(_png(la))), np.asarray(want))
