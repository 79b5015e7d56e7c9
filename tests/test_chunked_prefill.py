"""Chunked prefill (tiny random model, exact sampler, the engine stepped directly): a long prompt is encoded a few
chunks per engine step while the running requests keep denoising, and its tokens are those it gets encoded in one
engine step, or alone."""

from __future__ import annotations

import pytest

from dgemma.engine import Engine, SamplingParams

from .test_prefix_cache import BS, CHUNK, gen, model, prompt_of, run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def engine(model, gen, prefill_budget: int) -> Engine:
    return Engine(model, gen, max_num_seqs=4, max_model_len=256, sampler="exact", block_size=BS,
                  prefill_chunk=CHUNK, prefill_budget=prefill_budget)


def test_running_requests_keep_stepping_while_a_long_prompt_prefills(model, gen):
    eng = engine(model, gen, prefill_budget=2 * CHUNK)
    outs = [[], []]
    running = [eng.add_request(prompt_of(9 + i, 50 + i), SamplingParams(max_tokens=64, seed=i), outs[i].append)
               for i in range(2)]
    eng.step()
    eng.step()  # the budget (16 tokens) took the first prompt only in the first step
    assert not any(eng.runner.is_prefilling(r) for r in running)
    long_prompt = prompt_of(150, 7)
    long = eng.add_request(long_prompt, SamplingParams(max_tokens=16, seed=9), [].append)
    steps_before = [r.denoising_steps for r in running]
    prefill_steps = 0
    while eng.runner.is_prefilling(long) or long.status.value == "waiting":
        encoded = eng.runner.kv.tables[long.request_id].num_tokens if long.request_id in eng.runner.kv.tables else 0
        eng.step()
        prefill_steps += 1
        now = eng.runner.kv.tables[long.request_id].num_tokens
        assert now - encoded <= 2 * CHUNK  # the budget: two chunks per engine step
    assert prefill_steps == -(-150 // (2 * CHUNK))  # 10 steps of 16 tokens (the last of 6)
    assert long.denoising_steps == 1  # its first decoder pass ran in the step that encoded its last chunk
    # the running requests stepped once per engine step meanwhile (or finished their canvas and committed)
    assert [r.denoising_steps - s for r, s in zip(running, steps_before)] == [prefill_steps] * 2
    # each engine step's record: the prompt tokens it encoded and the rows it denoised (Engine.step_times)
    times = list(eng.step_times)
    assert [(t.prefill_tokens, t.rows) for t in times] == [(9, 1), (10, 2)] + [(16, 2)] * 9 + [(6, 3)]
    assert all(t.seconds > t.prefill_seconds + t.commit_seconds and t.prefill_seconds > 0 for t in times)
    assert any(t.commit_seconds > 0 for t in times)  # the running requests' canvases committed meanwhile and all(a.start + a.seconds <= b.start for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("budget", [CHUNK, 3 * CHUNK])
def test_chunked_prefill_gives_the_tokens_of_a_one_step_prefill(model, gen, budget):
    """The chunks are on one grid whatever the budget, so a prompt encoded over many engine steps, beside other
    requests, gives the tokens it gets encoded in one step, alone."""
    long = (prompt_of(140, 8), SamplingParams(max_tokens=40, seed=3, pin_prefix=False))
    others = [(prompt_of(12, 60 + i), SamplingParams(max_tokens=48, seed=i)) for i in range(2)]
    alone = run(engine(model, gen, prefill_budget=4096), [long])[0]
    eng = engine(model, gen, prefill_budget=budget)
    outputs: list[list] = [[], [], []]
    for (prompt, params), out in zip(others, outputs):
        eng.add_request(prompt, params, out.append)
    eng.step()
    eng.add_request(*long, outputs[2].append)
    for _ in range(2000):
        eng.step()
        if all(o and o[-1].finished for o in outputs):
            break
    assert [t for o in outputs[2] for t in o.token_ids] == alone
