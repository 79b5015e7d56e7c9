"""The `dgemma` command line: text prompts, chat, thinking, JSON output, canvas view, interactive chat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgemma.cli import main
from dgemma.testing import write_test_tokenizer
from dgemma.tokenizer import Tokenizer

from .conftest import make_reference_checkpoint


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    path = make_reference_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")
    write_test_tokenizer(path)
    return path


def _run(capsys, args):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_prompt_json_output(chat_checkpoint, capsys):
    code, out, err = _run(capsys, ["generate", "--model", str(chat_checkpoint), "--prompt", "Hello there",
                                   "--max-new-tokens", "20", "--max-denoising-steps", "3", "--seed", "1", "--json"])
    assert code == 0
    result = json.loads(out)
    (record,) = result["outputs"]
    assert 1 <= len(record["token_ids"]) <= 20 and record["finish_reason"] in ("stop", "length")
    if record["finish_reason"] == "length":
        assert len(record["token_ids"]) == 20  # no silent cap at the canvas size
    tok = Tokenizer.from_dir(chat_checkpoint)
    body = [t for t in record["token_ids"] if t not in tok.eos_token_ids]
    assert record["text"] == tok.decode(body)
    for key in ("canvases", "denoising_steps", "tokens_per_forward", "seconds", "tokens_per_second"):
        assert key in result["stats"]


def test_same_seed_same_tokens_and_batch(chat_checkpoint, capsys):
    args = ["generate", "--model", str(chat_checkpoint), "--prompt", "a", "--prompt", "a longer prompt",
            "--max-new-tokens", "40", "--max-denoising-steps", "2", "--seed", "9", "--json"]
    first = json.loads(_run(capsys, args)[1])
    second = json.loads(_run(capsys, args)[1])
    assert first["outputs"] == second["outputs"] and len(first["outputs"]) == 2
    assert first["stats"]["canvases"] == 3  # 40 tokens need three 16-token canvases


def test_chat_and_think_render_the_template(chat_checkpoint, capsys):
    code, out, _ = _run(capsys, ["generate", "--model", str(chat_checkpoint), "--prompt", "hi", "--think",
                                 "--max-new-tokens", "8", "--max-denoising-steps", "2", "--seed", "0", "--json"])
    assert code == 0
    record = json.loads(out)["outputs"][0]
    assert "reasoning_content" in record  # thought channel split from the answer (None when absent)


def test_show_canvas_draws_every_step(chat_checkpoint, capsys):
    code, out, err = _run(capsys, ["generate", "--model", str(chat_checkpoint), "--prompt", "hi", "--show-canvas",
                                   "--max-new-tokens", "16", "--max-denoising-steps", "3", "--seed", "0"])
    assert code == 0
    assert err.count("step 1/3") == 1 and "step 3/3" in err and "settled" in err


def test_prompt_ids_without_tokenizer(tiny_checkpoint, capsys):
    code, out, _ = _run(capsys, ["generate", "--model", str(tiny_checkpoint), "--prompt-ids", "3,4,5",
                                 "--max-new-tokens", "5", "--max-denoising-steps", "2", "--json"])
    assert code == 0 and json.loads(out)["outputs"][0]["text"] is None
    code, _, err = _run(capsys, ["generate", "--model", str(tiny_checkpoint), "--prompt", "text"])
    assert code == 2 and "no tokenizer.json" in err


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "3,999"], "outside the vocabulary"),
    (["--prompt-ids", "3", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--prompt-ids", "3", "--entropy-bound", "-1"], "entropy_bound"),
    (["--prompt-ids", "3", "--t-min", "0.9", "--t-max", "0.5"], "t_max must be greater than t_min"),
])
def test_bad_arguments_give_one_line(tiny_checkpoint, capsys, args, message):
    code, _, err = _run(capsys, ["generate", "--model", str(tiny_checkpoint), *args])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_interactive_chat_loop(chat_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--model", str(chat_checkpoint),
                           "--max-new-tokens", "8", "--max-denoising-steps", "2", "--seed", "0"],
                          input="hello\n/reset\nagain\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model>") == 2


def test_bench_serve_runs_against_a_local_server(capsys):
    """`dgemma bench-serve` drives a server on 127.0.0.1 with concurrent streaming clients and prints a table."""
    args = ["bench-serve", "--preset", "tiny", "--server", "thread", "--threads", "1", "--concurrency", "2",
            "--requests", "2", "--max-tokens", "8", "--max-denoising-steps", "4", "--time-limit", "60"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert rows[0][:2] == ["concurrency", "settled"]
    assert [(r[0], r[1], r[2]) for r in rows[1:]] == [("2", "on", "2"), ("2", "off", "2")]  # every request done


def test_bench_compares_engines_on_the_same_weights(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "32", "--steps", "4", "--threads", "1",
            "--repeats", "1", "--compare", "transformers", "--compare", "autoregressive", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["engine"] for r in out["results"]] == ["dgemma", "transformers", "autoregressive"]
    dgemma, ref = out["results"][:2]
    assert dgemma["forwards"] == ref["forwards"] == 4 and dgemma["tokens_per_forward"] == 32 / 4
    assert out["speedup_vs_transformers"] > 0 and out["machine"]["dgemma_peak_over_weights_and_cache"] > 0


def test_bench_times_fp8_weights_and_refuses_a_cpu_comparison_it_cannot_make(capsys):
    args = ["bench", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "32", "--steps", "4", "--threads", "1",
            "--repeats", "1", "--quantize", "fp8"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"]["weights"] == "fp8" and out["results"][0]["forwards"] == 4
    assert main(args + ["--compare", "transformers"]) == 2
    assert "fused FP8 experts" in capsys.readouterr().err
