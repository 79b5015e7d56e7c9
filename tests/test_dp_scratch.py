"""The canvas DP's largest temporaries in memory kept from one solve to the next (control/scratch.py): the same
answers as fresh arrays, the same memory on every call of a thread, its own memory in another thread, and fresh
arrays for sizes past the bound and for callers that do not ask for reuse."""

import threading

import numpy as np
import torch

from dgemma.control import Constraint, scratch
from dgemma.control.dp import CanvasDP, canvas_rule, class_scores, moves_of, solve_each
from tests.test_control import PERSON, tokenizer, vocab  # noqa: F401 (fixtures: a trained vocabulary)

C = 24


def test_the_same_memory_each_call_its_own_per_thread_and_none_past_the_bound(monkeypatch):
    first = scratch.scratch("test", (4, 8), np.float32)
    again = scratch.scratch("test", (2, 3), np.float64)  # smaller: the same memory, another view
    assert np.shares_memory(first, again) and again.shape == (2, 3) and again.dtype == np.float64
    assert not np.shares_memory(first, scratch.scratch("other", (4, 8), np.float32))
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(scratch.scratch("test", (4, 8), np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(first, elsewhere[0])
    monkeypatch.setattr(scratch, "MAX_KEPT", 64)
    big = scratch.scratch("test", (4, 8), np.float32)  # 128 bytes: made fresh, not kept
    assert not np.shares_memory(big, first) and np.shares_memory(scratch.scratch("test", (4, 4), np.float32), first)


def test_reused_reads_and_passes_give_the_answers_of_fresh_ones(vocab):  # noqa: F811
    """A CanvasDP reads into scratch memory and runs its full pass there: every answer equals the fresh arrays'
    (class_scores and Forward.run without reuse), canvas after canvas, with a budget that ends in the canvas."""
    c = Constraint.from_json_schema(PERSON, vocab)
    ends, done_from = canvas_rule(c, {}, 0, C, 20)
    g = torch.Generator().manual_seed(3)
    forward = moves_of(c).forward
    for seed in range(4):
        probs = (torch.randn(C, c.vocab_size, generator=g) * 3).softmax(-1)
        prefer = torch.where(torch.rand(C, generator=g) < 0.3, torch.randint(0, c.vocab_size, (C,), generator=g), -1)
        canvas = CanvasDP(c, c.initial_state, ends, done_from)
        read = canvas.read(probs)
        assert np.shares_memory(read.small, scratch.scratch("read", read.small.shape, read.small.dtype))
        best, nearest = canvas.best_and_nearest(read, None, prefer)
        fresh = solve_each(class_scores(probs, c, probs=True), [None, prefer], None, None, ends, done_from)
        assert torch.equal(best, fresh[0].tokens) and torch.equal(nearest, fresh[1].tokens)
        values = torch.randn(C, int(forward.set.max()) + 1, 2, generator=g).numpy()
        kept = forward.run(values, [c.initial_state], done_from, reuse=True).copy()
        assert np.array_equal(kept, forward.run(values, [c.initial_state], done_from))
