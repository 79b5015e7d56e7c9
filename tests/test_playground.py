"""The playground (GET /) in a real browser: the system's headless Chromium (Debian's `chromium` package) driven by
Playwright's Python API. Sudoku mode solves a puzzle with the embedded model; chat mode talks to a tiny random
model behind an API key; every test checks that the page asked nothing of any host but the server.

Without Playwright or the browser (`apt-get install chromium`; $DGEMMA_CHROMIUM names another binary) the browser
tests skip with the reason. $DGEMMA_SCREENSHOTS=DIR also saves the README's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from dgemma.io import checkpoint
from dgemma.engine import Engine
from dgemma.server import ServerThread, Serving, build_app
from dgemma.tasks.sudoku import ASSET_DIR
from dgemma.tasks.sudoku_puzzles import is_solution
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

KEY = "page-key"
CHAT_MODEL = "tiny-test"
PUZZLE = "124680309003940026079001004960478200402006007007300005000754012200100700741860903"
# a newspaper puzzle (32 givens, from the validation set) that the served model solves at some seeds and not others
NEWSPAPER = "300028190962000070010950000000000900000000037095030400023864009004090060000271003"
CHROMIUM = os.environ.get("DGEMMA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 30_000


pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DGEMMA_CHROMIUM)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


def serve(model_dir, name: str, api_key: str | None = None):
    ckpt = checkpoint.load(model_dir, quiet=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=2, max_model_len=256).start()
    return engine, ServerThread(build_app(Serving(engine, tokenizer, name), api_key=api_key)).start()


@pytest.fixture(scope="module")
def sudoku_server():
    """The embedded Sudoku model, served as `dgemma serve` serves it with no --model (its id is "sudoku")."""
    engine, srv = serve(ASSET_DIR, ASSET_DIR.name)
    yield srv
    srv.stop()
    engine.stop()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    engine, srv = serve(write_tiny_checkpoint(tmp_path_factory.mktemp("playground")), CHAT_MODEL, api_key=KEY)
    yield srv
    srv.stop()
    engine.stop()


@pytest.fixture
def open_page(browser):
    """open_page(server url, path) -> page; afterwards, checks that every request went to that server."""
    opened = []

    def open_(url: str, path: str = "/"):
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        opened.append((context, url, requests, errors))
        page.goto(url + path)
        return page

    yield open_
    for context, url, requests, errors in opened:
        context.close()
        assert requests, "the page made no requests at all"
        outside = [u for u in requests if not (u == url or u.startswith(url + "/"))]
        assert not outside, f"the page asked other hosts: {outside}"
        assert not errors, f"JavaScript errors: {errors}"


def screenshot(page, name: str) -> None:
    out = os.environ.get("DGEMMA_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)


def board_grid(page) -> list[int]:
    values = page.eval_on_selector_all("#board input", "cells => cells.map(c => c.value)")
    return [int(v) if v.isdigit() else 0 for v in values]


# -- the files --------------------------------------------------------------------------------------------------------
def test_page_is_static_files_with_a_strict_csp(sudoku_server):
    url = sudoku_server.url
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    # everything the page loads is on this server
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page.text)
    for name in re.findall(r"""(?:src|href)="/static/([^"]+)""", page.text) + ["sudoku.js", "chat.js", "api.js"]:
        r = httpx.get(f"{url}/static/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", name
    for bad in ("nope.js", "..%2Fapp.py", "..%2F..%2Fserver%2Fapp.py", "%2Fetc%2Fpasswd"):
        assert httpx.get(f"{url}/static/{bad}", timeout=10).status_code == 404
    # static files only: no endpoint beyond the API and the page
    assert httpx.post(url + "/", timeout=10).status_code == 405


# -- Sudoku mode ------------------------------------------------------------------------------------------------------
def test_sudoku_mode_solves_with_the_embedded_model_by_keyboard(open_page, sudoku_server):
    page = open_page(sudoku_server.url)
    page.wait_for_selector("#server-status[data-connected]")
    assert page.get_attribute("body", "data-mode") == "sudoku"  # the model id is "sudoku"
    assert page.is_hidden("#chat-mode")
    # keyboard only: type the puzzle (dots for blanks), Enter loads it, Enter on Solve solves it
    page.focus("#puzzle-text")
    page.keyboard.press("Control+A")
    page.keyboard.type(PUZZLE.replace("0", "."))
    page.keyboard.press("Enter")
    assert board_grid(page) == [int(c) for c in PUZZLE]
    page.focus("#sudoku-seed")
    page.keyboard.type("1")
    page.focus("#solve")
    page.keyboard.press("Enter")
    page.wait_for_selector("#sudoku-verdict[data-solved]")
    verdict = page.inner_text("#sudoku-verdict")
    assert page.get_attribute("#sudoku-verdict", "data-solved") == "true", verdict
    grid = board_grid(page)
    assert is_solution([int(c) for c in PUZZLE], grid), grid
    # the canvas was drawn while it settled: at least one draft before the end
    assert int(page.get_attribute("#board", "data-drafts")) >= 1
    steps = int(page.inner_text("#sudoku-stats [data-stat=steps]"))
    assert steps >= 1 and f"in {steps} denoising steps" in verdict
    states = "cs => cs.map(c => c.dataset.state)"
    assert all(s == "settled" for s in page.eval_on_selector_all("#board input", states))
    # the replay slider steps back through the drafts: in the first, only pinned givens have settled
    page.focus("#sudoku-frame")
    page.keyboard.press("Home")
    first = page.eval_on_selector_all("#board input", states)
    assert all(PUZZLE[i] != "0" for i, state in enumerate(first) if state == "settled")
    assert "draft" in first
    page.keyboard.press("ArrowRight")
    screenshot(page, "playground-sudoku.png")
    page.keyboard.press("End")
    assert board_grid(page) == grid and "the end" in page.inner_text("#sudoku-frame-text")


def test_sudoku_mode_pins_the_givens_and_solves_again_until_the_checker_accepts(open_page, sudoku_server):
    """As `dgemma sudoku solve` does, the page pins the givens (the server's `template`: each given a literal, each
    run of blanks a hole) and solves again with the next seed until the checker accepts (`tries`, 4 by default): it
    says which try solved it and shows that seed's answer."""
    puzzle = [int(c) for c in NEWSPAPER]
    template = re.sub(r"0+", lambda run: "{{%d}}" % len(run.group(0)), NEWSPAPER)

    def answer(seed: int) -> list[int] | None:
        text = httpx.post(sudoku_server.url + "/v1/completions", timeout=60,
                          json={"model": "sudoku", "prompt": NEWSPAPER, "seed": seed, "template": template}
                          ).json()["choices"][0]["text"]
        grid = [int(c) for c in text[:81]] if text[:81].isdigit() and len(text) >= 81 else None
        return grid if grid is not None and is_solution(puzzle, grid) else None

    seed = next(s for s in range(1, 9) if answer(s) is None and answer(s + 1) is not None)
    page = open_page(sudoku_server.url)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/completions") else None)
    page.wait_for_selector("#server-status[data-connected]")
    assert page.input_value("#sudoku-tries") == "4"
    page.fill("#puzzle-text", NEWSPAPER)
    page.click("#puzzle-form button[type=submit]")
    page.fill("#sudoku-seed", str(seed))
    page.fill("#sudoku-tries", "2")
    page.click("#solve")
    page.wait_for_selector("#sudoku-verdict[data-solved]")
    verdict = page.inner_text("#sudoku-verdict")
    assert page.get_attribute("#sudoku-verdict", "data-solved") == "true", verdict
    assert page.get_attribute("#sudoku-verdict", "data-tries") == "2" and "on try 2 of 2" in verdict
    assert board_grid(page) == answer(seed + 1)
    assert [(body["template"], body["seed"]) for body in sent] == [(template, seed), (template, seed + 1)]


def test_sudoku_board_keys_and_the_checker(open_page, sudoku_server):
    page = open_page(sudoku_server.url)
    page.wait_for_selector("#server-status[data-connected]")
    page.focus("#board input[data-index='0']")
    page.keyboard.press("Delete")  # empties the given 1
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")  # row 2, column 2
    page.keyboard.type("7x")  # 7 fills the cell and moves right; x is not a digit
    assert page.input_value("#puzzle-text") == "0" + PUZZLE[1:10] + "7" + PUZZLE[11:]
    assert page.evaluate("document.activeElement.dataset.index") == "11"
    assert page.eval_on_selector_all("#board input[tabindex='0']", "cs => cs.length") == 1  # one tab stop
    solution = httpx.post(sudoku_server.url + "/v1/completions", timeout=60,
                          json={"model": "sudoku", "prompt": PUZZLE, "seed": 1}).json()["choices"][0]["text"]
    grid = [int(c) for c in solution]
    assert is_solution([int(c) for c in PUZZLE], grid)
    check = """async ([puzzle, grid]) => {
        const {checkGrid} = await import('/static/sudoku.js');
        const r = checkGrid(puzzle, grid);
        return {solved: r.solved, problems: r.problems, bad: [...r.badCells].sort((a, b) => a - b)};
    }"""
    puzzle = [int(c) for c in PUZZLE]
    assert page.evaluate(check, [puzzle, grid]) == {"solved": True, "problems": [], "bad": []}
    swapped = grid[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]  # row 1 stays valid; the columns and a given do not
    r = page.evaluate(check, [[0] * 81, swapped])
    assert not r["solved"] and any(p.startswith("column 3 has 2") for p in r["problems"])
    r = page.evaluate(check, [puzzle, swapped])
    assert any("the given 4 became" in p for p in r["problems"]) and 3 in r["bad"]
    holes = grid[:]
    holes[5] = 0  # a blank of the puzzle
    assert page.evaluate(check, [puzzle, holes])["problems"] == ["1 cell is not filled with a digit 1-9"]
    # 200% zoom of a 1280-pixel window: 640 CSS pixels, and nothing scrolls sideways
    page.set_viewport_size({"width": 640, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


# -- chat mode --------------------------------------------------------------------------------------------------------
def test_chat_mode_with_an_api_key_streams_the_reply(open_page, chat_server):
    page = open_page(chat_server.url)
    # a locator, not wait_for_function: a string predicate that polls is eval'd in the page, which the page's CSP
    # (script-src 'self') forbids, so it failed whenever the status was not there at the first check
    page.locator("#server-status", has_text="API key").wait_for()
    assert page.evaluate("document.activeElement.id") == "api-key"  # 401: the page asks for the key
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#server-status[data-connected]")
    assert page.get_attribute("body", "data-mode") == "chat"
    page.press("summary:has-text('Diffusion')", "Enter")  # opens the settings
    page.fill("#max-tokens", "40")
    page.fill("#seed", "11")
    page.fill("#temperature", "0.05")
    page.focus("#message")
    page.keyboard.type("Hello")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(".turn.assistant[data-done]")
    assert page.inner_text("#chat-error") == ""
    shown = page.text_content(".turn.assistant .settled")
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    want = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=40, seed=11, temperature=0.05)
    assert shown == want.choices[0].message.content  # the settled stream is the answer
    assert page.text_content(".turn.assistant .draft-area") == ""  # no draft is left once the reply is done
    assert int(page.get_attribute(".turn.assistant .canvas", "data-drafts")) >= 1
    stats = {k: page.inner_text(f"#chat-stats [data-stat={k}]") for k in ("steps", "tokens", "tps", "ttft")}
    assert int(stats["steps"]) == want.usage.model_extra["denoising_steps"]
    assert int(stats["tokens"]) == want.usage.completion_tokens
    assert float(stats["tps"]) > 0 and stats["ttft"].endswith(" ms")
    # replay: some frame shows settled text followed by the draft of the rest
    page.focus("#chat-frame")
    page.keyboard.press("Home")
    for _ in range(int(page.get_attribute("#chat-frame", "max"))):
        if page.text_content(".turn.assistant .settled") and page.query_selector(".turn.assistant .draft"):
            break
        page.keyboard.press("ArrowRight")
    assert page.text_content(".turn.assistant .settled") and page.query_selector(".turn.assistant .draft")
    screenshot(page, "playground-chat.png")
    page.keyboard.press("End")
    assert page.text_content(".turn.assistant .settled") == shown


def test_chat_mode_json_schema_and_suffix(open_page, chat_server):
    page = open_page(chat_server.url, "/#chat")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#server-status[data-connected]")
    page.press("summary:has-text('Diffusion')", "Enter")
    page.press("summary:has-text('Steering')", "Enter")
    page.fill("#max-tokens", "24")
    page.fill("#seed", "3")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    page.fill("#json-schema", "{not json")
    page.fill("#message", "A number")
    page.press("#message", "Control+Enter")
    assert "not valid JSON" in page.inner_text("#json-schema-error")  # checked on the page, nothing sent
    assert page.evaluate("document.activeElement.id") == "json-schema"
    page.fill("#json-schema", json.dumps(schema))
    page.press("#message", "Control+Enter")
    page.wait_for_selector(".turn.assistant[data-done]")
    assert page.inner_text("#chat-error") == ""
    answer = json.loads(page.text_content(".turn.assistant .settled"))
    assert set(answer) == {"n"} and isinstance(answer["n"], int)
    # fill in the middle: the message becomes a raw prompt to /v1/completions
    page.fill("#json-schema", "")
    page.fill("#suffix", " end.")
    page.fill("#message", "Start:")
    page.press("#message", "Control+Enter")
    page.wait_for_selector(".turn.assistant:nth-of-type(4)[data-done]")
    assert page.inner_text("#chat-error") == ""
    assert page.get_attribute(".turn.assistant:nth-of-type(4)", "data-finish-reason") == "stop"
