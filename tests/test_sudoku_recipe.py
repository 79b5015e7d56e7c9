"""`dgemma sudoku train --recipe gpu --dry-run`: the one-GPU recipe's code path at tiny scale on the CPU, its option
precedence and time limit, and the objective's fixed-position options it trains with."""

import json

import pytest
import torch

from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_cli import main
from dgemma.tasks.sudoku_train_cli import DEFAULTS, DRY_RUN, RECIPES, resolve
from dgemma.train.objective import LossConfig, _corrupt_canvas, _decoder_loss


def _parse(*argv):
    import argparse

    from dgemma.tasks.sudoku_cli import add_sudoku_parser

    parser = argparse.ArgumentParser()
    add_sudoku_parser(parser.add_subparsers(dest="command"))
    return resolve(parser.parse_args(["sudoku", "train", *argv]))


def test_an_option_given_wins_over_the_dry_run_which_wins_over_the_recipe():
    plain = _parse()
    assert all(getattr(plain, k) == v for k, v in DEFAULTS.items())
    gpu = _parse("--recipe", "gpu")
    assert all(getattr(gpu, k) == v for k, v in RECIPES["gpu"].items())
    assert gpu.hidden_size == 256 and gpu.layers == 12 and gpu.time_limit <= 8
    dry = _parse("--recipe", "gpu", "--dry-run")
    assert (dry.layers, dry.hidden_size, dry.device, dry.tf32) == (DRY_RUN["layers"], DRY_RUN["hidden_size"], "cpu",
                                                                   False)
    assert (dry.pin_givens, dry.self_cond_passes, dry.eval_givens) == (1.0, 3, "44,23-36")  # the recipe's own
    mine = _parse("--recipe", "gpu", "--dry-run", "--steps", "5", "--fixed-givens", "clean", "--self-cond-passes", "2")
    assert (mine.steps, mine.fixed_givens, mine.self_cond_passes, mine.layers) == (5, "clean", 2, 2)


def test_gpu_recipe_dry_run_writes_a_model_transformers_loads(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from dgemma.io.checkpoint import load

    out = tmp_path / "run"
    assert main(["train", "--recipe", "gpu", "--dry-run", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (result["recipe"], result["dry_run"], result["steps"], result["presentations"]) == ("gpu", True, 3, 12)
    assert not result["stopped_by_time_limit"]
    # the recipe's evals: both difficulties, plain and pinned (it pins every training puzzle), and 1-step cells
    for g in ("44", "23-36"):
        for key in (f"solve_rate_{g}", f"solve_rate_{g}_pinned", f"steps_{g}", f"cells_1step_{g}"):
            assert key in result["validation"]
        assert 0.0 <= result["validation"][f"cells_1step_{g}"] <= 1.0
    record = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["options"]
    assert (record["recipe"], record["layers"], record["pin_givens"], record["time_limit"]) == ("gpu", 2, 1.0, 7.5)
    assert "model written to" in capsys.readouterr().out
    # still a DiffusionGemma checkpoint: transformers loads it and computes our logits
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(out / "model").eval()
    ours = load(out / "model", quiet=True).model.eval()
    puzzle, solution = S.heldout_set(1)[0]
    prompt = torch.tensor([S.prompt_ids(puzzle)])
    canvas = torch.tensor([S.response_ids(solution) + [S.EOS]])
    want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    cache = ours.new_cache(1, prompt.shape[1] + canvas.shape[1])
    ours.encode(prompt, cache)
    assert (ours.denoise(canvas, cache) - want).abs().max() < 1e-4


def test_time_limit_stops_training_then_evaluates_and_exports(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "gpu", "--dry-run", "--steps", "6", "--save-every", "2", "--eval-every", "100",
                 "--eval-givens", "44", "--time-limit", "0.001", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["stopped_by_time_limit"] and result["steps"] == 2 and result["planned_steps"] == 6
    assert "solve_rate_44" in result["validation"]  # evaluated at the step it stopped, though no eval was due
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["train", "--dry-run", "--time-limit", "0", "--out", str(tmp_path / "x")]) == 2


def test_fixed_positions_separate_never_noised_from_not_scored():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 12, (4, 10), generator=g)
    fixed = torch.zeros(4, 10, dtype=torch.bool)
    fixed[:, :5] = True
    t = torch.full((4,), 1.0)  # every position not held is replaced
    for mode, held, unscored in [("pin", True, fixed), ("clean", True, None), ("unscored", False, fixed)]:
        noisy, replaced, out = _corrupt_canvas(clean, t, 256, fixed, LossConfig(fixed_positions=mode),
                                               torch.Generator().manual_seed(1))
        assert bool(replaced[:, 5:].all())
        assert bool((~replaced[:, :5]).all()) == held and torch.equal(noisy[:, :5], clean[:, :5]) == held
        assert (out is None) if unscored is None else torch.equal(out, unscored)
    # the loss over the scored positions only: right on the fixed ones, wrong on the rest, or the other way round
    logits = torch.full((4, 10, 256), -10.0)
    logits.scatter_(2, clean[..., None], 10.0)
    logits[:, 5:] = logits[:, 5:].roll(1, dims=2)  # the unfixed positions predict the wrong token
    cfg = LossConfig()
    wrong, acc = _decoder_loss(logits, clean, t, fixed, cfg, 1 / int((~fixed).sum()))
    everything, acc_all = _decoder_loss(logits, clean, t, None, cfg, 1.0)
    assert float(acc) == 0.0 and float(acc_all) == 0.5 and float(wrong) == pytest.approx(2 * float(everything), 1e-3)
    with pytest.raises(ValueError, match="fixed_positions"):
        LossConfig(fixed_positions="never")
