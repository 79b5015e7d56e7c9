"""The canvas DP's forward pass by branch and bound (control/bounded.py): the answers of the full pass, bit for bit,
with ties, held tokens, preferred draws and budgets; it reads fewer pairs; and it gives the full pass the case
whenever its bound cannot help."""

import numpy as np
import pytest
import torch

from dgemma.control import Constraint
from dgemma.control import bounded, dp
from dgemma.control.dp import class_scores, solve_each
from tests.test_control import PERSON, tiny, tokenizer, vocab  # noqa: F401 (fixtures: a 10-token vocabulary, a trained one)

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "note": {"type": "string", "maxLength": 12}, "tags": PERSON["properties"]["tags"]},
          "required": ["id", "note"], "additionalProperties": False}


class Passes:
    """Counts what bounded_scores gave: scores, or None (the full pass ran)."""

    def __init__(self, monkeypatch):
        self.scores, self.gave_up, self.read = [], 0, 0
        real, real_ranges, real_beam = bounded.bounded_scores, bounded.ranges, bounded._beam
        in_beam = []

        def ranges(first, count):  # the pairs the pass reads (not its beam's)
            self.read += 0 if in_beam else int(count.sum())
            return real_ranges(first, count)

        def beam(*args):
            in_beam.append(1)
            try:
                return real_beam(*args)
            finally:
                in_beam.pop()
        monkeypatch.setattr(bounded, "ranges", ranges)
        monkeypatch.setattr(bounded, "_beam", beam)

        def counted(*args):
            score = real(*args)
            if score is None:
                self.gave_up += 1
            else:
                self.scores.append(score)
            return score
        monkeypatch.setattr(dp, "bounded_scores", counted)


def same(a, b):
    return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.states, y.states) and x.log_prob == y.log_prob
               for x, y in zip(a, b))


def cases(c, canvas, seed):
    """(log-probs, solve_each's arguments) over budgets that end in, after and past the canvas, held prefixes and
    pins, preferred draws, and log-probs rounded to a few values (ties everywhere) or all equal."""
    g = torch.Generator().manual_seed(seed)
    for k in range(12):
        lp = (torch.randn(canvas, c.vocab_size, generator=g) * (1 + 3 * (k % 3))).log_softmax(-1)
        if k % 4 == 1:
            lp = (lp * 2).round() / 2  # a handful of values: many tied sequences
        elif k % 4 == 3:
            lp = torch.full_like(lp, -float(np.log(c.vocab_size)))  # every sequence ties
        max_new = (None, canvas // 2, canvas, 2 * canvas)[k % 4]
        ends, done_from = dp.canvas_rule(c, {}, 0, canvas, max_new)
        read = class_scores(lp, c)
        free = solve_each(read, [None], None, None, ends, done_from)[0].tokens
        held = torch.full((canvas,), -1)
        held[: (k * 3) % canvas] = free[: (k * 3) % canvas]  # a settled prefix
        if k % 2:
            held[canvas - 1 - k % 5] = int(torch.randint(0, c.vocab_size, (1,), generator=g))  # a pin, maybe not allowed
        prefer = torch.where(torch.rand(canvas, generator=g) < 0.5,
                             torch.randint(0, c.vocab_size, (canvas,), generator=g), -1)
        yield read, ([None, prefer], None, held, ends, done_from)


@pytest.mark.parametrize("beam", [1, bounded.BEAM])
@pytest.mark.parametrize("schema", [PERSON, SCHEMA])
def test_the_bounded_pass_gives_the_answers_of_the_full_pass(vocab, schema, beam, monkeypatch):  # noqa: F811
    """Every lane's tokens, states and log-prob equal the full pass's, bit for bit; and the bounded pass did the
    work, keeping fewer states than the full pass scores (a beam of 1 often finds no sequence that meets the
    budget: the full pass then runs)."""
    c = Constraint.from_json_schema(schema, vocab)
    monkeypatch.setattr(bounded, "BEAM", beam)
    monkeypatch.setattr(bounded, "MAX_SKIP", 0)  # no backing off: every lane tries the bounded pass
    passes = Passes(monkeypatch)
    full_reads = 0  # pairs the full pass would have read for the lanes the bounded pass answered
    for read, args in cases(c, 32, seed=len(str(schema)) + beam):
        monkeypatch.setattr(dp, "BOUNDED_PAIRS", 1 << 40)
        want = solve_each(read, *args)
        monkeypatch.setattr(dp, "BOUNDED_PAIRS", 0)
        before = len(passes.scores)
        got = solve_each(read, *args)
        assert same(got, want)
        full_reads += (len(passes.scores) - before) * len(dp.moves_of(c).pair_src) * 32
    assert passes.scores, "the bounded pass never gave scores"
    if beam > 1:
        assert passes.read < full_reads / 2, (passes.read, full_reads)  # the pass read under half the pairs
    if beam == 1:
        assert passes.gave_up  # and handed some cases to the full pass


def test_the_bounded_pass_equals_the_full_pass_on_tiny_automata(tiny, monkeypatch):  # noqa: F811
    """Regex automata over a 10-token vocabulary, every canvas position tied or not."""
    monkeypatch.setattr(bounded, "MAX_SKIP", 0)
    passes = Passes(monkeypatch)
    for pattern in (r'(ab|a|b)+1?', r'\{("(a|b)*":1)?\}', r'a*b*(ab)?', r'(a1|b111)*'):
        c = Constraint.from_regex(pattern, tiny)
        for read, args in cases(c, 6, seed=len(pattern)):
            monkeypatch.setattr(dp, "BOUNDED_PAIRS", 1 << 40)
            try:
                want = solve_each(read, *args)
            except dp.ConstraintError as err:
                monkeypatch.setattr(dp, "BOUNDED_PAIRS", 0)
                with pytest.raises(dp.ConstraintError, match="no sequence"):
                    solve_each(read, *args)
                assert "no sequence" in str(err)
                continue
            monkeypatch.setattr(dp, "BOUNDED_PAIRS", 0)
            assert same(solve_each(read, *args), want), pattern
    assert passes.scores


def test_a_bound_that_keeps_failing_backs_off_and_tries_again(vocab, monkeypatch):  # noqa: F811
    """With a pass that always gives up (PASS_SHARE 0), lanes run the full pass 2, 4, 8 ... at most MAX_SKIP lanes
    between tries, and the answers stay the full pass's; one pass that holds resets the count."""
    c = Constraint.from_json_schema(SCHEMA, vocab)
    layout = bounded.layout_of(c)
    layout.misses = layout.skip = 0
    monkeypatch.setattr(bounded, "PASS_SHARE", 0.0)
    monkeypatch.setattr(bounded, "MAX_SKIP", 4)
    monkeypatch.setattr(dp, "BOUNDED_PAIRS", 0)
    tried = []
    real = bounded._bounded
    monkeypatch.setattr(bounded, "_bounded", lambda *a: tried.append(len(tried)) or real(*a))
    lp = torch.randn(32, c.vocab_size, generator=torch.Generator().manual_seed(3)).log_softmax(-1)
    read = class_scores(lp, c)
    calls = []
    for lane in range(16):
        before = len(tried)
        solve_each(read, [torch.full((32,), -1)])
        calls.append(len(tried) - before)
    assert calls == [1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]  # skips of 2, 4, then MAX_SKIP
    monkeypatch.setattr(bounded, "PASS_SHARE", 1.0)
    layout.skip = 0
    solve_each(read, [torch.full((32,), -1)])
    assert layout.misses == 0 and layout.skip == 0


def test_scores_that_can_rise_are_left_to_the_full_pass(vocab):  # noqa: F811
    """The bound holds only when no step can raise a score (log-probs, <= 0): a positive value gives None."""
    c = Constraint.from_json_schema(SCHEMA, vocab)
    moves = dp.moves_of(c)
    layout = bounded.layout_of(c)
    layout.skip = 0
    values = np.zeros((8, len(moves.set_classes)), dtype=np.float32)
    values[3, 0] = 0.5
    end_ok = np.ones(moves.num_states + 1, dtype=bool)
    assert bounded._bounded(layout, values, [int(moves.forward.internal[c.initial_state])], None, end_ok, None) is None


def test_the_second_lane_is_bounded_by_the_first_lanes_answer(vocab, monkeypatch):  # noqa: F811
    """A step's two lanes differ where draws are preferred (here one position): the second lane's bar is the first
    lane's answer scored under its values, so one beam runs for the two, and both answers are the full pass's.
    (A budget that ends inside the canvas, where the bound holds for this small automaton.)"""
    c = Constraint.from_json_schema(SCHEMA, vocab)
    ends, done_from = dp.canvas_rule(c, {}, 0, 32, 16)
    monkeypatch.setattr(bounded, "MAX_SKIP", 0)
    beams, bars = [], []
    real_beam, real_scores = bounded._beam, bounded.bounded_scores
    monkeypatch.setattr(bounded, "_beam", lambda *a: beams.append(1) or real_beam(*a))
    monkeypatch.setattr(dp, "bounded_scores", lambda *a: bars.append(a[-1]) or real_scores(*a))
    g = torch.Generator().manual_seed(5)
    for k in range(6):
        read = class_scores((torch.randn(32, c.vocab_size, generator=g) * 4).log_softmax(-1), c)
        prefer = torch.full((32,), -1)
        prefer[k * 5] = int(torch.randint(0, c.vocab_size, (1,), generator=g))
        monkeypatch.setattr(dp, "BOUNDED_PAIRS", 1 << 40)
        want = solve_each(read, [None, prefer], None, None, ends, done_from)
        monkeypatch.setattr(dp, "BOUNDED_PAIRS", 0)
        beams.clear()
        bars.clear()
        assert same(solve_each(read, [None, prefer], None, None, ends, done_from), want)
        assert bars[0] is None and bars[1] is not None and len(beams) == 1, (k, bars, beams)
