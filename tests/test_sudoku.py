"""Sudoku task: generator, solver, checker, held-out set, formatting, tokenizer and the CLI's error handling."""

from __future__ import annotations

import random

import pytest
import torch

from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_puzzles import (broken_rules, count_solutions, format_grid, generate_puzzles, is_solution,
                                         make_puzzle, naked_singles_solve, parse_grid, shuffle_symmetry, solve)


KNOWN = parse_grid("530070000600195000098000060800060003400803001700020006060000280000419005000080079")
KNOWN_SOLUTION = parse_grid("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def test_solver_and_checker_on_a_known_puzzle():
    assert solve(KNOWN, limit=2) == [KNOWN_SOLUTION]
    assert is_solution(KNOWN, KNOWN_SOLUTION)
    swapped = list(KNOWN_SOLUTION)
    swapped[2], swapped[3] = swapped[3], swapped[2]  # breaks a column/box, keeps the row
    assert not is_solution(KNOWN, swapped)
    assert broken_rules(KNOWN_SOLUTION) == 0 and broken_rules(swapped) == 4  # two columns, two boxes
    changed = list(KNOWN_SOLUTION)
    changed[0] = changed[1]  # a repeat in its row, and in its column and box, which lose a digit
    assert broken_rules(changed) == 3
    other = list(KNOWN_SOLUTION)
    assert not is_solution([9] + KNOWN[1:], other)  # does not keep a given
    assert not is_solution(KNOWN, KNOWN_SOLUTION[:80])
    assert not is_solution(KNOWN, [0] + KNOWN_SOLUTION[1:])
    assert count_solutions([0] * 81, limit=2) == 2
    assert count_solutions([1, 1] + [0] * 79) == 0


@pytest.mark.parametrize("givens", [25, 36, 50])
def test_generated_puzzles_are_unique_with_the_requested_givens(givens):
    for puzzle, solution in generate_puzzles(5, givens, seed=givens):
        assert sum(d != 0 for d in puzzle) == givens
        assert is_solution(puzzle, solution)
        assert count_solutions(puzzle, limit=2) == 1


def test_generation_is_seeded():
    assert generate_puzzles(3, 40, seed=7) == generate_puzzles(3, 40, seed=7)
    assert generate_puzzles(3, 40, seed=7) != generate_puzzles(3, 40, seed=8)
    with pytest.raises(ValueError):
        make_puzzle(random.Random(0), 10)


def test_heldout_set_is_fixed_and_prefix_stable():
    a = S.heldout_set(4)
    assert a == S.heldout_set(4) and S.heldout_set(2) == a[:2]
    assert all(sum(d != 0 for d in p) == S.GIVENS for p, _ in a)


def test_the_evaluation_sets_are_the_ones_the_figures_were_measured_on():
    """The held-out, validation and hard sets (their first puzzles) hash to what the generator gave when the README's
    and BENCHMARKS' figures were measured: a change to the generator or the solver that moves a puzzle fails here,
    so a faster generator must give the same puzzles."""
    import hashlib

    def digest(puzzles) -> str:
        return hashlib.sha256(repr(puzzles).encode()).hexdigest()

    assert digest(S.heldout_set(30, 44)) == "ebcb2795672e341f450b9fadb0bb8abc423b927cccdba6f20f6b1d31aa1d685e"
    assert digest(S.heldout_set(30, (23, 36))) == "b2ff851cab402b23fd8ab1d93e8a4b0c207df297846ed11d13dcb53979f1daef"
    assert digest(S.heldout_set(30, (23, 36), validation=True)) == \
        "ab410aea3eca4b755340f2700a20878add787158ea9c792367d3d99577b4c9ac"
    assert digest(S.hard_set(10)) == "08e7a327882ef3c6592cd904e4700f94e522351d9d22d52f9ca739e3bcf8f60c"


def test_symmetries_keep_puzzles_valid_and_unique():
    rng = random.Random(0)
    puzzle, solution = generate_puzzles(1, 30, seed=1)[0]
    for _ in range(5):
        p, s = shuffle_symmetry(puzzle, solution, rng)
        assert is_solution(p, s) and count_solutions(p, 2) == 1 and sum(d != 0 for d in p) == 30


def test_naked_singles_solves_an_easy_puzzle():
    puzzle, solution = generate_puzzles(1, 50, seed=3)[0]
    assert naked_singles_solve(puzzle) == solution


def test_formatting_and_tokenizer(tmp_path):
    from dgemma.testing import write_sudoku_tokenizer
    from dgemma.text.tokenizer import Tokenizer

    ids = S.prompt_ids(KNOWN)
    assert len(ids) == 82 and ids[0] == S.BOS and ids[1] == S.DIGIT0 + 5 and ids[3] == S.DIGIT0
    assert S.decode_grid(S.response_ids(KNOWN_SOLUTION) + [S.EOS]) == KNOWN_SOLUTION
    assert S.decode_grid(S.response_ids(KNOWN)) is None  # zeros are not a solution
    assert S.decode_grid([S.DIGIT0 + 1] * 80) is None
    tok = Tokenizer.from_dir(S.write_tokenizer(tmp_path / "ours").parent)
    theirs = Tokenizer.from_dir(write_sudoku_tokenizer(tmp_path / "theirs"))
    text = format_grid(KNOWN)
    assert tok.encode(text, add_special_tokens=True) == ids
    assert tok.encode(text + " |.\n") == theirs.encode(text + " |.\n")
    assert tok.vocab_size == S.sudoku_config().text.vocab_size == len(S.VOCAB)
    assert tok.decode(S.response_ids(KNOWN_SOLUTION) + [S.EOS]) == format_grid(KNOWN_SOLUTION)
    assert tok.eos_token_ids == [S.EOS] and tok.pad_token_id == S.PAD


def test_config_fits_one_canvas_and_size_budget():
    cfg = S.sudoku_config()
    assert cfg.canvas_length == 82 and cfg.text.sliding_window >= 2 * 82
    assert cfg.text.num_parameters() * 4 < 25 * 2**20


def test_stream_is_resumable():
    a = S.SudokuStream(seed=3, pool_size=20)
    a.next_batch(4)
    state = a.state_dict()
    b = S.SudokuStream(seed=99, pool_size=20)
    b.load_state_dict(state)
    assert [e.prompt_ids for e in a.next_batch(5)] == [e.prompt_ids for e in b.next_batch(5)]
    for ex in a.next_batch(3):
        assert is_solution([d - S.DIGIT0 for d in ex.prompt_ids[1:]], [d - S.DIGIT0 for d in ex.response_ids])


def test_stream_pins_givens_with_the_asked_probability():
    """pin_givens=1 fixes exactly the givens of every example, 0 none, 0.5 about half."""
    pinned = S.SudokuStream(seed=3, pool_size=20, pin_givens=1.0).next_batch(6)
    for ex in pinned:
        assert ex.fixed == [i for i, d in enumerate(ex.prompt_ids[1:]) if d != S.DIGIT0]
    plain = S.SudokuStream(seed=3, pool_size=20).next_batch(6)
    assert all(ex.fixed is None for ex in plain)
    half = S.SudokuStream(seed=4, pool_size=20, pin_givens=0.5).next_batch(200)
    assert 70 < sum(ex.fixed is not None for ex in half) < 130


def test_evaluate_counts_solved_puzzles():
    from dgemma.presets import random_model

    model = random_model(S.sudoku_config(hidden_size=48, num_layers=2))
    puzzles = S.heldout_set(3)
    answers = []
    score = S.evaluate(model, puzzles, S.sudoku_generation().replace(max_denoising_steps=2), batch_size=2,
                       on_answer=lambda *answer: answers.append(answer))
    assert score.total == 3 and score.solved == 0 and 1 <= score.mean_steps <= 2
    # on_answer sees each puzzle in order, with its solution, the decoded grid (None unless 81 digits) and its steps
    assert [(p, s) for p, s, _, _ in answers] == puzzles
    assert all(grid is None or len(grid) == 81 for _, _, grid, _ in answers)
    assert sum(steps for *_, steps in answers) / 3 == score.mean_steps


def test_cli_errors_are_one_line(tmp_path, capsys):
    from dgemma.tasks.sudoku_cli import main

    def cli(*argv):
        return main(list(argv))

    assert cli("solve", "123") == 2
    assert cli("solve", "11" + "0" * 79) == 2
    assert cli("solve", format_grid(KNOWN), "--model", str(tmp_path)) == 2
    assert cli("eval", "--model", str(tmp_path), "--puzzles", "0") == 2
    err = capsys.readouterr().err
    assert err.count("dgemma sudoku: error:") == 4 and "Traceback" not in err


def test_solve_pins_the_givens_so_none_is_overwritten(capsys):
    """On an untrained model (which writes noise) every given still comes back in place."""
    from dgemma.presets import random_model

    model = random_model(S.sudoku_config(hidden_size=48, num_layers=2), seed=3)
    puzzles = S.heldout_set(4)
    out = S.generate(model, [S.prompt_ids(p) for p, _ in puzzles], S.sudoku_generation().replace(max_denoising_steps=3),
                     steering=[S.givens_steering(p) for p, _ in puzzles])
    for (puzzle, _), ids in zip(puzzles, out.token_ids):
        assert all(ids[i] == S.DIGIT0 + d for i, d in enumerate(puzzle) if d)


def test_repair_seed_and_cli_flags(capsys):
    from dgemma.tasks.sudoku_cli import main

    puzzle, solution = S.heldout_set(1)[0]
    wrong = S.corrupt(solution, 5, __import__("random").Random(0))
    assert sum(a != b for a, b in zip(wrong, solution)) == 5
    grid = "".join(map(str, solution))
    assert main(["solve", "".join(map(str, puzzle)), "--repair", grid, "--strength", "0", "--threads", "1"]) == 0
    assert "valid solution" in capsys.readouterr().out
    assert main(["solve", "".join(map(str, puzzle)), "--repair", "0" * 81]) == 2
    assert main(["solve", "".join(map(str, puzzle)), "--repair", grid, "--strength", "3"]) == 2


def test_a_constraint_the_model_already_meets_changes_nothing():
    """The embedded model writes 81 digits anyway: constrained to [1-9]{81}, every puzzle's tokens (draws included)
    are the unconstrained ones, so the constraint cannot lower the solve rate."""
    import torch

    from dgemma.io import checkpoint
    from dgemma.control import Constraint, ConstraintVocabulary
    from dgemma.control.pins import Steering
    from dgemma.generate import generate
    from dgemma.text.tokenizer import Tokenizer

    ck = checkpoint.load(S.ASSET_DIR, quiet=True)
    vocab = ConstraintVocabulary.from_tokenizer(Tokenizer.from_dir(S.ASSET_DIR).backend, [S.EOS], [S.PAD],
                                                ck.config.text.vocab_size)
    digits = Constraint.from_regex("[1-9]{81}", vocab)
    prompts = [S.prompt_ids(p) for p, _ in S.heldout_set(8, S.GIVENS)]
    runs = [generate(ck.model, prompts, ck.generation, generator=torch.Generator().manual_seed(0),
                     steering=steering) for steering in (None, [Steering(constraint=digits)] * len(prompts))]
    assert runs[1].token_ids == runs[0].token_ids and runs[1].steps_per_canvas == runs[0].steps_per_canvas


@torch.no_grad()
def test_grow_depth_inserts_silent_layers_and_keeps_the_function():
    """A 3-layer model grown to 6 layers computes the same encoder states and the same denoising logits; the three
    new layers are copies of the sliding layers before them with zeroed output norms, the full-attention layer
    stays last, and training can open them (their output norms get gradients)."""
    from dgemma.presets import random_model

    small = random_model(S.sudoku_config(hidden_size=48, num_layers=3), seed=1).eval()
    grown = S.grow_depth(small, S.sudoku_config(hidden_size=48, num_layers=6)).eval()
    assert len(grown.layers) == 6 and grown.layers[5].self_attn.head_dim == small.layers[2].self_attn.head_dim
    silent = [i for i, layer in enumerate(grown.layers) if not layer.post_attention_layernorm.weight.any()]
    assert silent == [1, 2, 4]  # 3 extra over 2 sliding layers: two after the first, one after the second
    torch.testing.assert_close(grown.layers[1].self_attn.q_proj.weight, small.layers[0].self_attn.q_proj.weight)
    tokens = torch.tensor([S.prompt_ids(KNOWN)])
    caches = [m.new_cache(1, 164) for m in (small, grown)]
    hidden = [m.encode(tokens, c) for m, c in zip((small, grown), caches)]
    torch.testing.assert_close(hidden[1], hidden[0])
    canvas = torch.randint(0, S.VOCAB_SIZE, (1, 82), generator=torch.Generator().manual_seed(0))
    logits = [m.denoise(canvas, c, None) for m, c in zip((small, grown), caches)]
    torch.testing.assert_close(logits[1], logits[0])
    with torch.enable_grad():
        grown.train()
        grown.logits(grown.encode(tokens, grown.new_cache(1, 82))).sum().backward()
    assert grown.layers[1].post_attention_layernorm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot grow"):
        S.grow_depth(grown, S.sudoku_config(hidden_size=48, num_layers=4))


@torch.no_grad()
def test_grow_vocabulary_keeps_the_model_on_its_own_tokens():
    """A model of the 20 words grown to the padded vocabulary computes the same hidden states and the same logits
    over those 20 tokens; the new tokens get embedding rows of their own."""
    from dgemma.presets import random_model

    small = random_model(S.sudoku_config(hidden_size=48, num_layers=2, vocab_size=len(S.WORDS)), seed=1)
    config = S.sudoku_config(hidden_size=48, num_layers=2)
    grown = S.grow_vocabulary(small, config, seed=0).eval()
    assert grown.embed_tokens.weight.shape == (S.VOCAB_SIZE, 48) == (len(S.VOCAB), 48)
    tokens = torch.tensor([S.prompt_ids(KNOWN)])
    hidden = [m.encode(tokens, m.new_cache(1, 82)) for m in (small, grown)]
    torch.testing.assert_close(hidden[1], hidden[0])
    torch.testing.assert_close(grown.logits(hidden[1])[..., :len(S.WORDS)], small.logits(hidden[0]))
    assert grown.embed_tokens.weight[len(S.WORDS):].std() > 0.01
    with pytest.raises(ValueError, match="cannot grow"):
        S.grow_vocabulary(grown, S.sudoku_config(hidden_size=48, num_layers=2, vocab_size=30))
