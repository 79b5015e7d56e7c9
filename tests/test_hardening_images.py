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
