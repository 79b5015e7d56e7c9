"""The trainer: schedule, resumable checkpoints (also after SIGKILL), export that transformers loads, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgemma.presets import default_generation, preset_config, random_model
from dgemma.train.batch import Example
from dgemma.train.data import ShuffledExamples
from dgemma.train.run_dir import RUN_MANIFEST
from dgemma.train.trainer import CHECKPOINT, TrainConfig, Trainer, lr_factor


ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(vocab_size=64, canvas_length=6, sliding_window=5)


def make_trainer(out, steps=8, save_every=2, seed=0) -> Trainer:
    """A tiny full-training run over random examples with two canvases."""
    torch.set_num_threads(1)  # the same reductions in every process, so runs compare bit for bit
    config = preset_config("tiny", **CONFIG)
    model = random_model(config, std=0.05, seed=seed).train()
    g = torch.Generator().manual_seed(seed)
    examples = [Example([2] + torch.randint(3, 64, (int(n),), generator=g).tolist(),
                        torch.randint(3, 64, (int(m),), generator=g).tolist())
                for n, m in zip(torch.randint(2, 7, (10,), generator=g), torch.randint(1, 11, (10,), generator=g))]
    cfg = TrainConfig(steps=steps, batch_size=3, lr=1e-3, warmup_steps=2, log_every=1, eval_every=1000,
                      save_every=save_every, seed=seed)
    return Trainer(model, config, default_generation(config), cfg, ShuffledExamples(examples, seed=seed), out,
                   quiet=True)


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    assert a.step == b.step
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.data.state_dict() == b.data.state_dict()
    strip = lambda h: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        TrainConfig(steps=0)


def test_resume_gives_the_uninterrupted_state(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.train()
    first = make_trainer(tmp_path / "b")
    first.train(stop_after=3)
    assert first.step == 3 and (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = make_trainer(tmp_path / "b", seed=0)
    resumed.load()
    assert resumed.step == 3
    resumed.train()
    _assert_same_state(straight, resumed)
    assert (tmp_path / "b" / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


def _run_until_three_steps(script: str, out: Path) -> subprocess.Popen:
    """Start `script` (a training run into `out`) in another process; return once it has logged 3 steps."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            return proc
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the training process logged fewer than 3 steps in 60 s")


def test_resume_after_sigkill(tmp_path):
    """A separate process trains and checkpoints every step; it is killed with SIGKILL mid-run, and the resumed
    run ends in the state of a run that was never interrupted."""
    out = tmp_path / "killed"
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from tests.test_train_trainer import make_trainer\n"
              "t = make_trainer(%r, steps=400, save_every=1)\n"
              "t.train()\n") % (str(ROOT), str(out))
    proc = _run_until_three_steps(script, out)
    try:
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = make_trainer(out, steps=400, save_every=1)
    resumed.load()
    stopped_at = resumed.step
    assert 1 <= stopped_at < 400
    target = stopped_at + 2
    resumed.train(stop_after=2)  # two more steps of the 400-step schedule
    straight = make_trainer(tmp_path / "straight", steps=400, save_every=1000)
    straight.train(stop_after=target)
    _assert_same_state(straight, resumed)
    # metrics.jsonl holds each step once
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, target + 1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_saves_it(tmp_path, sig):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) mid-run: the run finishes its step, saves it (no
    periodic save would have: save_every is 1000) and stops; resumed, it ends in the uninterrupted state."""
    out = tmp_path / "stopped"
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from tests.test_train_trainer import make_trainer\n"
              "from dgemma.train.trainer import TrainingStopped\n"
              "t = make_trainer(%r, steps=400, save_every=1000)\n"
              "try:\n"
              "    t.train()\n"
              "except TrainingStopped as e:\n"
              "    print(e, file=sys.stderr)\n"
              "    sys.exit(3)\n") % (str(ROOT), str(out))
    proc = _run_until_three_steps(script, out)
    try:
        os.kill(proc.pid, sig)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, err
    resumed = make_trainer(out, steps=400, save_every=1000)
    resumed.load()
    stopped_at = resumed.step
    assert 3 <= stopped_at < 400 and f"stopped after step {stopped_at} of 400" in err
    assert f"{signal.Signals(sig).name}: stopping after this step" in err
    resumed.train(stop_after=2)
    straight = make_trainer(tmp_path / "straight", steps=400, save_every=1000)
    straight.train(stop_after=stopped_at + 2)
    _assert_same_state(straight, resumed)


def test_the_cli_says_where_a_stopped_run_saved(tmp_path, capsys, monkeypatch):
    """In the CLI, Ctrl-C during step 2 of `dgemma train`: exit 130, one line naming the saved step and how to go
    on, and --resume continues from that step; the signal handlers are restored afterwards."""
    from dgemma.cli import main
    from dgemma.testing import write_test_tokenizer
    from dgemma.train.trainer import Trainer

    tok = write_test_tokenizer(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)])
    out = tmp_path / "run"
    common = ["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(out), "--quiet",
              "--batch-size", "2", "--save-every", "100", "--device", "cpu", "--steps", "5"]
    step = Trainer.train_step

    def interrupted_step(self, examples):
        if self.step == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, examples)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    assert main(common) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"dgemma train: stopped after step 2 of 5, its checkpoint saved in {out}; resume " \
                                   f"with --resume"
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main([*common, "--resume"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 5]  # the stopped window is logged, not dropped


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    t = make_trainer(tmp_path)
    t.train(stop_after=2)
    good = (tmp_path / CHECKPOINT).read_bytes()

    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        t.save()
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    # no temporary left (the run manifest is not one)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != RUN_MANIFEST) == []


@torch.no_grad()
def test_trained_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dgemma.io.checkpoint import load

    with torch.enable_grad():
        t = make_trainer(tmp_path / "run", steps=3)
        t.train()
    out = t.export(tmp_path / "export")
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    ours = load(out, quiet=True)
    for (n, p), q in zip(t.model.state_dict().items(), ours.model.state_dict().values()):
        assert torch.equal(p, q), n
    C, V = ours.config.canvas_length, ours.config.text.vocab_size
    g = torch.Generator().manual_seed(2)
    prompt, canvas = torch.randint(3, V, (2, 9), generator=g), torch.randint(0, V, (2, C), generator=g)
    want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    cache = t.model.new_cache(2, 9 + C)
    t.model.eval().encode(prompt, cache)
    assert (t.model.denoise(canvas, cache) - want).abs().max() < 1e-4


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_pairs_and_chat(tmp_path):
    from dgemma.testing import write_test_tokenizer
    from dgemma.text.tokenizer import Tokenizer
    from dgemma.train.data import DataError, read_jsonl

    tok = Tokenizer.from_dir(write_test_tokenizer(tmp_path / "tok"))
    pair = {"prompt": "2+2=", "response": "4"}
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    raw = read_jsonl(_write_jsonl(tmp_path / "raw.jsonl", [pair]), tok, template="raw")
    assert raw[0].prompt_ids == [tok.bos_token_id] + tok.encode("2+2=") and raw[0].response_ids == tok.encode("4")
    with pytest.raises(DataError, match="needs a chat template"):
        read_jsonl(_write_jsonl(tmp_path / "conv.jsonl", [conversation]), tok, template="raw")
    chat = read_jsonl(_write_jsonl(tmp_path / "d.jsonl", [pair, conversation]), tok)  # auto: the tokenizer's template
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[1].prompt_ids == tok.encode(prompt_text)
    assert tok.decode(chat[1].response_ids, skip_special_tokens=False).startswith("hello")
    for bad, msg in (("{not json", "not valid JSON"), ({"prompt": "x"}, "expected string fields"),
                     ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                      "last message")):
        with pytest.raises(DataError, match=msg):
            read_jsonl(_write_jsonl(tmp_path / "bad.jsonl", ["", bad]), tok)


def test_cli_trains_a_preset_and_reports_bad_input_in_one_line(tmp_path, capsys):
    from dgemma.cli import main
    from dgemma.testing import write_test_tokenizer

    def cli(*argv):
        return main(["train", *argv])

    tok = write_test_tokenizer(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)])
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(out), "--quiet",
              "--batch-size", "2", "--save-every", "2", "--device", "cpu"]
    assert cli(*common, "--steps", "2", "--lora-rank", "2") == 0
    assert (out / "model" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert cli(*common, "--steps", "3") == 2  # the run exists and --resume was not given
    assert cli(*common, "--steps", "3", "--lora-rank", "2", "--resume") == 0
    assert cli("--preset", "nope", "--tokenizer", str(tok), "--data", str(data), "--out", str(tmp_path / "x")) == 2
    assert cli("--preset", "tiny", "--tokenizer", str(tok), "--data", str(tmp_path / "missing.jsonl"),
               "--out", str(tmp_path / "y")) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dgemma train: error:")]
    assert len(lines) == 3 and "Traceback" not in err


def test_cli_takes_the_self_conditioning_options(tmp_path, capsys):
    """`dgemma train --self-cond-passes N --sampled-canvas P` reach the objective (the first step's loss moves, same
    seed and data); a probability outside [0, 1] exits 2 in one line before any run is written."""
    import json

    from dgemma.cli import main
    from dgemma.testing import write_test_tokenizer

    tok = write_test_tokenizer(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i} b{i} c{i}"} for i in range(4)])

    def first_loss(name, *extra):
        out = tmp_path / name
        assert main(["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
                     "--quiet", "--batch-size", "2", "--steps", "1", "--device", "cpu", *extra]) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["dec_loss"]

    plain = first_loss("plain")
    assert first_loss("plain-again") == plain
    assert first_loss("refined", "--self-cond-passes", "3", "--sampled-canvas", "1.0") != plain
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out",
                 str(tmp_path / "bad"), "--quiet", "--sampled-canvas", "2"]) == 2
    err = capsys.readouterr().err
    assert "sampled_canvas" in err and err.count("\n") == 1 and not (tmp_path / "bad" / "checkpoint.safetensors").exists()


def test_checkpoint_is_safetensors_and_pickles_are_refused(tmp_path):
    """The resume state is tensors plus JSON metadata: loading it never unpickles. An old pickled checkpoint.pt
    is refused with a clear message, not loaded."""
    from safetensors import safe_open

    from dgemma.train.trainer import LEGACY_CHECKPOINT

    trainer = make_trainer(tmp_path / "run", steps=2, save_every=1)
    trainer.train()
    with safe_open(str(tmp_path / "run" / CHECKPOINT), framework="pt") as f:
        assert "dgemma_train_state" in f.metadata() and len(list(f.keys())) > 0
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / LEGACY_CHECKPOINT).write_bytes(b"\x80\x04not really a pickle")
    fresh = make_trainer(legacy, steps=2)
    with pytest.raises(ValueError, match="does not unpickle"):
        fresh.load()
