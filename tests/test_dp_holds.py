"""The canvas DP with held tokens and a budget that ends inside the canvas: the forward pass starts after a held
prefix the automaton can walk (dp._held_walk) and is DONE's own loop past the budget (moves.Forward.run); the
answers equal exhaustive search and the whole pass."""

import numpy as np
import pytest
import torch

from dgemma.control import INVALID, Constraint
from dgemma.control import dp
from dgemma.control.dp import class_scores, completable_states, solve_each
from tests.test_control import PERSON, tiny, tokenizer, vocab  # noqa: F401 (fixtures: a 10-token vocabulary, a trained one)

C = 4


def brute_force(log_probs, constraint, start, hard, end_states, done_from):
    """(held tokens dropped, tokens) of the best sequence by the DP's rule: fewest held tokens dropped, then the
    largest sum of log-probs; states after positions from done_from on are DONE, the last in end_states."""
    vocab_size = log_probs.shape[1]
    values = log_probs.tolist()
    best = [(float("-inf"), float("-inf")), None]

    def search(c, state, dropped, score, tokens):
        if done_from is not None and c >= max(done_from, 1) and state != constraint.done_state:
            return
        if c == C:
            if (end_states is None or end_states[state]) and (-dropped, score) > best[0]:
                best[:] = [(-dropped, score), list(tokens)]
            return
        for token in range(vocab_size):
            nxt = constraint.next_state(state, token)
            if nxt == INVALID:
                continue
            held = int(hard[c])
            drop = int(held >= 0 and token != held)
            tokens.append(token)
            search(c + 1, nxt, dropped + drop, score + (0.0 if held >= 0 else values[c][token]), tokens)
            tokens.pop()

    search(0, start, 0, 0.0, [])
    return (None, None) if best[1] is None else (-best[0][0], best[1])


def whole_pass(monkeypatch, *args):
    """solve_each without the held-prefix start: the forward pass over every position."""
    with monkeypatch.context() as m:
        m.setattr(dp, "_held_walk", lambda constraint, start, hard, done_from: [start])
        return solve_each(*args)


@pytest.mark.parametrize("pattern", [r'(ab|a|b)+1?', r'\{("(a|b)*":1)?\}', r'a*b*(ab)?'])
def test_held_prefix_and_budget_equal_brute_force_and_the_whole_pass(tiny, pattern, monkeypatch):  # noqa: F811
    c = Constraint.from_regex(pattern, tiny)
    walks = []  # the length of each forward pass's walk: 1 when it starts at position 0
    forward = dp.moves_of(c).forward
    real_run = forward.run
    monkeypatch.setattr(forward, "run", lambda sv, walk, *rest, **kw: walks.append(len(walk)) or
                        real_run(sv, walk, *rest, **kw))
    rng = torch.Generator().manual_seed(0)
    kept = dropped = 0
    for seed in range(24):
        log_probs = torch.randn(C, tiny.vocab_size, generator=rng).log_softmax(-1)
        read = class_scores(log_probs, c)
        free = solve_each(read, [None], c.initial_state)[0].tokens
        for hard_kind in ("prefix of an answer", "random prefix", "prefix and a pin", "none"):
            hard = torch.full((C,), -1)
            n = int(torch.randint(1, C + 1, (1,), generator=rng))
            if hard_kind == "prefix of an answer":
                hard[:n] = free[:n]
            elif hard_kind == "random prefix":
                hard[:n] = torch.randint(0, tiny.vocab_size, (n,), generator=rng)
            elif hard_kind == "prefix and a pin":
                hard[:1], hard[C - 1] = free[:1], int(torch.randint(0, tiny.vocab_size, (1,), generator=rng))
            for done_from in (None, 0, 2, 3):
                for ends in (None, completable_states(c, {}, 0, 1, eos=True)):
                    want_dropped, want = brute_force(log_probs, c, c.initial_state, hard, ends, done_from)
                    args = (read, [None, torch.where(hard < 0, free, -1)], c.initial_state, hard, ends, done_from)
                    try:
                        got = solve_each(*args)
                    except dp.ConstraintError:
                        assert want is None
                        continue
                    whole = whole_pass(monkeypatch, *args)
                    for a, b in zip(got, whole):
                        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states)
                        assert a.log_prob == b.log_prob
                    assert int(((hard >= 0) & (got[0].tokens != hard)).sum()) == want_dropped
                    if want_dropped == 0:
                        assert got[0].tokens.tolist() == want
                        kept += 1
                    else:
                        dropped += 1
    assert kept and dropped  # both kinds of case came up
    assert max(walks) > 1 and min(walks) == 1  # the pass started after a held prefix, and from position 0


def test_a_step_in_a_settled_canvas_passes_over_its_free_positions_only(tiny, monkeypatch):  # noqa: F811
    """The forward pass starts where the held prefix ends: it runs over the canvas's free positions only, and the
    answer keeps the prefix."""
    c = Constraint.from_regex(r"(ab|a|b)+", tiny)
    forward = dp.moves_of(c).forward
    real_run, positions = forward.run, []
    monkeypatch.setattr(forward, "run", lambda sv, walk, *rest, **kw: positions.append(len(sv) - len(walk) + 1) or
                        real_run(sv, walk, *rest, **kw))
    log_probs = torch.randn(16, c.vocab_size, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    read = class_scores(log_probs, c)
    free = solve_each(read, [None])[0].tokens
    held = torch.where(torch.arange(16) < 10, free, -1)
    assert torch.equal(solve_each(read, [None], None, held)[0].tokens, free) and positions == [16, 6]


def test_a_held_prefix_that_costs_more_held_tokens_later_is_dropped(tiny):  # noqa: F811
    """Keeping the held "a" forces "a1" and drops both held "1"s after it; dropping it keeps them ("b111"): the
    pass after the prefix drops held tokens, so the whole pass decides, and drops the one."""
    c = Constraint.from_regex(r"a1|b111", tiny)
    a, b, one = (tiny.token_bytes.index(t.encode()) for t in ("a", "b", "1"))
    read = class_scores(torch.zeros(C, c.vocab_size).log_softmax(-1), c)
    got = solve_each(read, [None], None, torch.tensor([a, -1, one, one]))[0]
    assert got.tokens.tolist() == [b, one, one, one]


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_the_forward_pass_on_threads_equals_one_thread(vocab, threads, monkeypatch):
    """moves.Forward.run splits a position's groups into runs, one a thread (PART_ELEMENTS and GROUP_COST lowered so
    that a small automaton splits): every score equals the one-thread pass, bit for bit (max and + are exact either way)."""
    from dgemma.control import moves

    monkeypatch.setattr(moves, "GROUP_COST", 0)  # a group for each in-degree: runs to cut
    c = Constraint.from_json_schema(PERSON, vocab)
    c.forget("moves")  # the layout is kept with the (cached) constraint
    forward = dp.moves_of(c).forward
    c.forget("moves")
    assert len(forward.groups) >= threads  # each thread has a group of its own
    g = torch.Generator().manual_seed(0)
    set_value = torch.randn(24, int(forward.set.max()) + 1, 2, generator=g).numpy()
    one = forward.run(set_value, [c.initial_state], 20)
    monkeypatch.setattr(moves, "PART_ELEMENTS", 1)
    assert len(forward._parts(threads, set_value.dtype, 2)) == threads
    assert np.array_equal(forward.run(set_value, [c.initial_state], 20, threads), one)


@pytest.mark.parametrize("probs", [False, True], ids=["log-probs", "probabilities"])
def test_the_scatter_read_gives_the_tokens_of_the_numpy_read(vocab, probs):  # noqa: F811
    """class_scores(scatter=True) (what a canvas on an accelerator takes: one scatter-max, (C, K) to the host) and
    the numpy read give the same class maxima, tokens, states and log-prob, on the CPU: with masked (-inf) rows and
    columns, ties inside classes, held and preferred tokens, and a big class (JSON string text)."""
    c = Constraint.from_json_schema(PERSON, vocab)
    assert dp.moves_of(c).big_classes  # a class read from the row maxima on the numpy side
    g = torch.Generator().manual_seed(0)
    for seed in range(8):
        lp = (torch.randn(24, c.vocab_size, generator=g) * 3).log_softmax(-1)
        lp[:, torch.randperm(c.vocab_size, generator=g)[:c.vocab_size // 3]] = -torch.inf  # masked tokens
        lp[seed % 24] = -torch.inf  # a masked row
        lp[:, 40:60] = lp[:, 40:41]  # ties
        given = lp.exp() if probs else lp
        numpy_read, scatter_read = (class_scores(given, c, probs=probs, scatter=s) for s in (False, True))
        assert np.array_equal(numpy_read.best, scatter_read.best)
        free = solve_each(numpy_read, [None])[0].tokens
        held = torch.where(torch.arange(24) < seed, free, -1)
        prefer = torch.where(torch.rand(24, generator=g) < 0.5, torch.randint(0, c.vocab_size, (24,), generator=g), -1)
        for a, b in zip(solve_each(numpy_read, [None, prefer], None, held), solve_each(scatter_read, [None, prefer], None, held)):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states) and a.log_prob == b.log_prob


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_pairs", [dp.DEVICE_PAIRS, 0], ids=["forward-on-host", "forward-on-cuda"])
def test_a_canvas_on_cuda_is_read_there_with_the_tokens_of_the_cpu(vocab, device_pairs, monkeypatch):  # noqa: F811
    """Log-probs on a CUDA device are read by scatter there (the default), and the forward pass runs there too past
    DEVICE_PAIRS: the tokens and states of the numpy read and pass over the same log-probs on the CPU."""
    monkeypatch.setattr(dp, "DEVICE_PAIRS", device_pairs)
    c = Constraint.from_json_schema(PERSON, vocab)
    g = torch.Generator().manual_seed(0)
    for seed in range(4):
        lp = (torch.randn(24, c.vocab_size, generator=g) * 3).log_softmax(-1)
        held = torch.where(torch.arange(24) < 2 * seed, solve_each(class_scores(lp, c), [None])[0].tokens, -1)
        on_cuda = class_scores(lp.cuda(), c)
        assert on_cuda.token_class is not None and on_cuda.log_probs.is_cuda
        a, b = solve_each(class_scores(lp, c), [None], None, held)[0], solve_each(on_cuda, [None], None, held)[0]
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states)


def test_the_forward_pass_in_torch_gives_the_numpy_scores(vocab, monkeypatch):  # noqa: F811
    """A canvas read by scatter runs its forward pass where it was read (torch; here the CPU, with DEVICE_PAIRS
    lowered): the answers of the numpy pass, bit for bit, with held prefixes, preferred draws and a budget that ends
    inside the canvas."""
    c = Constraint.from_json_schema(PERSON, vocab)
    ends, done_from = dp.canvas_rule(c, {}, 0, 24, 20)
    g = torch.Generator().manual_seed(1)
    devices = []
    real_run = dp.moves_of(c).forward.run
    monkeypatch.setattr(dp.moves_of(c).forward, "run", lambda *a, **kw: devices.append(a[-1]) or real_run(*a, **kw))
    for seed in range(6):
        lp = (torch.randn(24, c.vocab_size, generator=g) * 3).log_softmax(-1)
        free = solve_each(class_scores(lp, c), [None], None, None, ends, done_from)[0].tokens
        held = torch.where(torch.arange(24) < 3 * seed, free, -1)
        prefer = torch.where(torch.rand(24, generator=g) < 0.5, torch.randint(0, c.vocab_size, (24,), generator=g), -1)
        args = ([None, prefer], None, held, ends, done_from)
        want = solve_each(class_scores(lp, c), *args)
        with monkeypatch.context() as m:
            m.setattr(dp, "DEVICE_PAIRS", 0)
            got = solve_each(class_scores(lp, c, scatter=True), *args)
        for a, b in zip(want, got):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states) and a.log_prob == b.log_prob
    assert None in devices and any(d is not None and d[0].device == torch.device("cpu") for d in devices)  # both ran


def test_a_canvas_whose_best_tokens_are_allowed_takes_them_without_the_pass(tiny, monkeypatch):  # noqa: F811
    """When the best class at every position already makes an allowed sequence (a confident model's tokens obey
    the constraint), that sequence is the answer, found by one walk (dp._allowed_walk); a lane whose best tokens are
    not allowed still takes the pass, alone. Every answer equals the pass's."""
    c = Constraint.from_regex(r"(ab|a|b)+", tiny)
    forward = dp.moves_of(c).forward
    real_run, lanes = forward.run, []
    monkeypatch.setattr(forward, "run", lambda sv, *rest, **kw: lanes.append(sv.shape[2]) or real_run(sv, *rest, **kw))
    g = torch.Generator().manual_seed(3)
    log_probs = torch.randn(16, c.vocab_size, generator=g).log_softmax(-1)
    free = solve_each(class_scores(log_probs, c), [None])[0].tokens
    assert lanes == [1]  # random log-probs: their best tokens are not allowed
    confident = log_probs.clone()
    confident[torch.arange(16), free] += 20  # the allowed answer is now the best token everywhere
    read = class_scores(confident.log_softmax(-1), c)
    anything = torch.randint(0, c.vocab_size, (16,), generator=g)  # a draw the constraint does not allow
    got = solve_each(read, [None, anything])
    assert lanes == [1, 1] and torch.equal(got[0].tokens, free)  # the second lane alone took the pass
    with monkeypatch.context() as m:
        m.setattr(dp, "_allowed_walk", lambda *args: None)
        passed = solve_each(read, [None, anything])
    for a, b in zip(got, passed):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.states, b.states) and a.log_prob == b.log_prob
