"""The serving engine on CPU with tiny random models: exactness against the offline loop, batch invariance,
settled-prefix streaming, admission and cancellation. The engine is stepped directly (no thread) so every loop is
bounded and deterministic."""

from __future__ import annotations

import pytest
import torch

from dgemma.engine import Engine, QueueFullError, RequestError, SamplingParams
from dgemma.engine.detokenizer import TextStream
from dgemma.engine.scheduler import canvases_for
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model

C = 16


pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models


@pytest.fixture(scope="module")
def model():
    # std 0.1: at a low temperature (tau 0.05) the argmax settles within a canvas, so prefixes settle and pin
    return random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)


@pytest.fixture(scope="module")
def gen(model):
    cfg = preset_config("tiny", canvas_length=C, vocab_size=256)
    return default_generation(cfg).replace(max_denoising_steps=8)


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], arrive_at: list[int] | None = None,
        max_steps: int = 500) -> list[list]:
    """Step the engine until all jobs finish; job i is added before step arrive_at[i]. -> outputs per job."""
    outputs: list[list] = [[] for _ in jobs]
    arrive_at = arrive_at or [0] * len(jobs)
    for step in range(max_steps):
        for i, (prompt, params) in enumerate(jobs):
            if arrive_at[i] == step:
                engine.add_request(prompt, params, outputs[i].append)
        engine.step()
        if all(o and o[-1].finished for o in outputs):
            return outputs
    raise AssertionError("the engine did not finish within the step budget")


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.mark.parametrize("sampler", ["exact", "fast"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_request_reproduces_offline_generate(model, gen, seed, sampler):
    """Prefix pinning off: a request with seed S is token-exact with generate(..., Generator().manual_seed(S))
    under the same sampler (one row: the lockstep and per-request draw policies draw the same numbers)."""
    prompt = [5, 6, 7, 8, 9, 10, 11]
    ref = generate(model, [prompt], gen.replace(max_new_tokens=40), generator=torch.Generator().manual_seed(seed),
                   sampler=sampler)
    engine = Engine(model, gen, max_num_seqs=2, max_model_len=256, sampler=sampler)
    (out,) = run(engine, [(prompt, SamplingParams(max_tokens=40, seed=seed, pin_prefix=False))])
    assert len(ref.token_ids[0]) > C  # more than one canvas: commits are covered
    assert tokens(out) == ref.token_ids[0]
    assert out[-1].finish_reason == ref.finish_reasons[0]
    assert out[-1].denoising_steps == ref.stats.denoising_steps


@pytest.mark.parametrize("pin", [False, True])
def test_continuous_batching_matches_each_request_alone(model, gen, pin):
    """Requests at different context lengths and denoising steps, arriving mid-flight, more than there are rows:
    each gets the tokens it gets alone, bit for bit, under SDPA's default CPU kernel. (That kernel sums over keys in
    vector lanes by index, so a shorter context batched with a longer one, its keys followed by masked ones, rounds
    2e-6 away from the row alone on an AVX-512 CPU, enough to move a settled prefix: attention runs row by row over
    each row's own keys when the rows' lengths differ, ForwardPlan.spans.)"""
    jobs = [([5, 6, 7], SamplingParams(max_tokens=32, seed=1, pin_prefix=pin, temperature=0.05)),
            ([9] * 20, SamplingParams(max_tokens=20, seed=2, pin_prefix=pin)),
            ([3, 4], SamplingParams(max_tokens=17, seed=3, pin_prefix=pin, temperature=0.05, entropy_bound=1.0)),
            ([7, 8, 9, 10, 11], SamplingParams(max_tokens=16, seed=4, pin_prefix=pin, max_denoising_steps=5)),
            ([12] * 9, SamplingParams(max_tokens=12, seed=5, pin_prefix=pin, temperature=0.0))]
    alone = [tokens(run(Engine(model, gen, max_num_seqs=1, max_model_len=256), [job])[0]) for job in jobs]
    together = run(Engine(model, gen, max_num_seqs=3, max_model_len=256), jobs, arrive_at=[0, 0, 3, 5, 9])
    assert [tokens(o) for o in together] == alone


def test_rows_at_different_lengths_compute_what_each_computes_alone(model):
    """A decoder pass and a commit over rows whose contexts differ (3, 20 and 2 tokens) give each row's logits and
    K/V bit for bit as the row alone: each row attends over its own keys (ForwardPlan.spans), not over the longest
    row's range with the rest masked, which the CPU kernel sums in another order."""
    with torch.inference_mode():  # as the engine runs (the module's other tests leave inference-mode buffers)
        _check_rows_at_different_lengths(model)


def _check_rows_at_different_lengths(model):
    lengths = [3, 20, 2]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (1, n), generator=g) for n in lengths]
    canvas = torch.randint(0, 256, (3, C), generator=g)
    together = model.new_cache(3, 64)
    for r, p in enumerate(prompts):
        model.encode(p, together, rows=[r])
    plan = model.plan(together, [0, 1, 2], C, encoder=False)
    assert plan.spans is not None and plan.spans[False] == [(0, 3 + C), (0, 20 + C), (0, 2 + C)]
    logits = model.denoise(canvas, together, rows=[0, 1, 2])
    model.encode(canvas, together, rows=[0, 1, 2])  # the commit
    for r, p in enumerate(prompts):
        alone = model.new_cache(1, 64)
        model.encode(p, alone, rows=[0])
        assert torch.equal(model.denoise(canvas[r:r + 1], alone, rows=[0]), logits[r:r + 1])
        model.encode(canvas[r:r + 1], alone, rows=[0])
        n = lengths[r] + C
        assert all(torch.equal(a[0, :, :n], b[r, :, :n]) for a, b in zip(alone.k + alone.v, together.k + together.v))


@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_batched_sampler_gives_the_row_samplers_tokens(model, gen, sampler):
    """On CPU the runner samples a row at a time through one buffer; on a GPU, the whole batch at once."""
    from dgemma.engine.runner import ModelRunner
    from dgemma.step import Strategy

    jobs = [([5, 6, 7], SamplingParams(max_tokens=32, seed=1, temperature=0.05)),
            ([9] * 20, SamplingParams(max_tokens=20, seed=2, pin_prefix=False)),
            ([12] * 9, SamplingParams(max_tokens=12, seed=5, temperature=0.0))]
    row_by_row = Engine(model, gen, max_num_seqs=3, max_model_len=256, sampler=sampler)
    assert row_by_row.runner.strategy is Strategy.ROWS
    batched = Engine(model, gen, max_num_seqs=3, max_model_len=256, sampler=sampler)
    batched.runner = ModelRunner(model, 3, 256, gen.stability_threshold, gen.confidence_threshold, sampler,
                                 Strategy.BATCHED)
    want = [tokens(o) for o in run(row_by_row, jobs, arrive_at=[0, 1, 2])]
    assert [tokens(o) for o in run(batched, jobs, arrive_at=[0, 1, 2])] == want


@pytest.mark.parametrize("strategy", ["rows", "batched"])
@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_top_k_and_top_p_cut_their_own_row_only(model, gen, sampler, strategy):
    """A cut is per request: a request without one gets the tokens it gets alone when batched with cut ones; a
    top_p too small to keep more than the most probable token gives top_k=1's tokens; a cut changes the tokens."""
    from dgemma.engine.runner import ModelRunner

    def engine(rows: int) -> Engine:
        e = Engine(model, gen, max_num_seqs=rows, max_model_len=256, sampler=sampler)
        e.runner = ModelRunner(model, rows, 256, gen.stability_threshold, gen.confidence_threshold, sampler, strategy)
        return e

    prompt = [5, 6, 7]

    def job(**cut):
        return prompt, SamplingParams(max_tokens=32, seed=1, temperature=1.5, pin_prefix=False, **cut)

    alone = tokens(run(engine(1), [job()])[0])
    batched = run(engine(3), [job(top_k=3), job(), job(top_p=0.5)])
    assert tokens(batched[1]) == alone
    top1 = tokens(run(engine(1), [job(top_k=1)])[0])
    assert tokens(run(engine(1), [job(top_p=1e-9)])[0]) == top1
    assert len({tuple(alone), tuple(top1), tuple(tokens(batched[0]))}) == 3


def test_settled_prefix_streams_before_commit_and_is_never_retracted(model, gen):
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=256)
    reports = []  # (tokens reported so far, the request's committed tokens at that moment)
    request = engine.add_request([5, 6, 7], SamplingParams(max_tokens=48, seed=1, temperature=0.05),
                                 lambda o: reports.append((o, list(request.committed))))
    for _ in range(200):
        engine.step()
        if reports and reports[-1][0].finished:
            break
    streamed = [t for o, _ in reports for t in o.token_ids]
    # some tokens were reported before their canvas was committed
    assert any(o.completion_tokens > len(committed) for o, committed in reports if o.token_ids)
    # and every one of them is what the canvas committed in the end
    final = (request.committed + request.settled)[: len(streamed)]
    assert streamed == final and reports[-1][0].finish_reason in ("stop", "length")


def test_same_seed_same_tokens_different_seed_different(model, gen):
    engine = Engine(model, gen, max_num_seqs=3, max_model_len=256)
    a, b, c = run(engine, [([5, 6], SamplingParams(max_tokens=16, seed=7)), ([5, 6], SamplingParams(max_tokens=16, seed=7)),
                           ([5, 6], SamplingParams(max_tokens=16, seed=8))])
    assert tokens(a) == tokens(b) != tokens(c)


def test_admission_errors_name_the_field(model, gen):
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=64, max_waiting=1)
    sink = [].append
    cases = [([], SamplingParams(), "prompt"),
             ([300], SamplingParams(), "prompt"),
             ([5] * 64, SamplingParams(), "prompt"),
             ([5] * 50, SamplingParams(), "prompt"),  # no room for one 16-token canvas
             ([5] * 10, SamplingParams(max_tokens=60), "max_tokens"),  # 4 canvases: 10 + 64 > 64
             ([5], SamplingParams(stop=["x"]), "stop"),  # no tokenizer
             ([5], SamplingParams(t_min=0.9, t_max=0.5), "t_max")]
    for prompt, params, param in cases:
        with pytest.raises(RequestError) as e:
            engine.add_request(prompt, params, sink)
        assert e.value.param == param, str(e.value)
    for field, value in [("max_tokens", 0), ("temperature", 2.5), ("temperature", True), ("seed", "1"),
                         ("max_denoising_steps", 0), ("entropy_bound", -1.0), ("stop", [""]), ("top_k", 0),
                         ("top_k", -1), ("top_k", 2.0), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5),
                         ("top_p", float("nan")), ("top_p", "0.9")]:
        with pytest.raises(RequestError) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
    engine.add_request([5] * 10, SamplingParams(max_tokens=48), sink)  # 10 + 3 * 16 fits exactly... 58 <= 64
    engine.add_request([5], SamplingParams(max_tokens=1), sink)  # the free row takes the first, the queue this one
    with pytest.raises(QueueFullError):
        engine.add_request([5], SamplingParams(max_tokens=1), sink)


def test_a_request_arriving_while_a_row_is_free_is_never_refused(model, gen):
    # max_waiting bounds the requests waiting beyond the free rows, so a burst fills every free row even before
    # the engine steps, and only what is left over counts against the queue
    engine = Engine(model, gen, max_num_seqs=3, max_model_len=64, max_waiting=1)
    sink = [].append
    first = [engine.add_request([5], SamplingParams(max_tokens=16), sink) for _ in range(4)]
    with pytest.raises(QueueFullError):
        engine.add_request([5], SamplingParams(max_tokens=16), sink)
    engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 1
    with pytest.raises(QueueFullError):
        engine.add_request([5], SamplingParams(max_tokens=16), sink)
    engine.abort(first[0].request_id)
    engine.abort(first[1].request_id)
    engine.step()  # two rows freed, one taken by the waiting request: one free row
    assert engine.num_running == 2 and engine.num_waiting == 0
    engine.add_request([5], SamplingParams(max_tokens=16), sink)
    engine.add_request([5], SamplingParams(max_tokens=16), sink)
    with pytest.raises(QueueFullError):
        engine.add_request([5], SamplingParams(max_tokens=16), sink)


def test_max_tokens_unset_runs_to_the_context_limit_not_a_fixed_cap():
    assert canvases_for(3, None, 16, 256) == 15  # (256 - 3) // 16 canvases: 240 tokens
    assert canvases_for(3, 17, 16, 256) == 2
    with pytest.raises(RequestError):
        canvases_for(250, None, 16, 256)


def test_abort_frees_the_row_at_once(model, gen):
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=256)
    outs_a, outs_b = [], []
    a = engine.add_request([5, 6], SamplingParams(max_tokens=200, seed=0), outs_a.append)
    engine.add_request([7, 8], SamplingParams(max_tokens=16, seed=0), outs_b.append)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort(a.request_id)
    engine.step()  # the aborted row is freed before admission, so b is admitted in the same step
    assert outs_a[-1].finished and outs_a[-1].finish_reason == "abort"
    assert engine.num_running == 1 and engine.scheduler.running[0].request_id != a.request_id
    for _ in range(100):
        if outs_b and outs_b[-1].finished:
            break
        engine.step()
    assert outs_b[-1].finish_reason in ("stop", "length") and engine.num_running == 0


def test_engine_thread_serves_blocking_requests(model, gen):
    engine = Engine(model, gen, max_num_seqs=2, max_model_len=256).start()
    try:
        out = engine.generate([5, 6, 7], SamplingParams(max_tokens=20, seed=3), timeout=60)
    finally:
        engine.stop()
    assert out.finish_reason in ("stop", "length") and out.completion_tokens == len(out.token_ids) <= 20


def test_text_stream_holds_back_possible_stop_strings():
    def decode(ids, skip_special_tokens):
        return "".join(chr(i) for i in ids)

    def feed(ts, s):
        return ts.update([ord(c) for c in s], final=False)

    ts = TextStream(decode, True, [1], ["STOP"])
    text = "".join(feed(ts, s) for s in ["ab", "cS", "T", "x", "STO"])
    assert text == "abcSTx" and not ts.stopped
    text += feed(ts, "Pzz")
    assert ts.stopped and text == "abcSTx" and feed(ts, "more") == ""
    ts = TextStream(decode, True, [1], [])
    assert ts.update([104, 0xFFFD], final=False) == ""  # text ending in an incomplete character waits
    assert ts.update([105, 1], final=True) == "h\ufffdi"  # EOS never becomes text


def test_text_stream_decodes_merging_tokens_like_the_whole_text():
    """Byte-level tokens of a multi-byte character only make text once the character is complete."""
    from tokenizers import decoders

    byte_level = decoders.ByteLevel()
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    pieces = {i: c for i, c in enumerate(alphabet)}
    ids_of = {c: i for i, c in pieces.items()}
    text = "héllo ✓ wörld"
    chars = ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    ids = [ids_of[c] for word, _ in chars for c in word]

    def decode(ids, skip_special_tokens):
        return byte_level.decode([pieces[i] for i in ids])

    ts = TextStream(decode, True, [], [])
    out = "".join(ts.update([t], final=False) for t in ids) + ts.update([], final=True)
    assert out == text


def test_outputs_merge_into_one_chunk():
    """Outputs queued while a slow client is served go out as one chunk: tokens and text joined in order, the
    newest draft (None means unchanged), the later output's end."""
    from dgemma.engine.request import RequestOutput

    a = RequestOutput("r", [1, 2], "ab", draft="x")
    b = RequestOutput("r", [3], "c", draft=None)
    c = RequestOutput("r", [4], "d", finished=True, finish_reason="stop", completion_tokens=4)
    m = a.merged(b)
    assert (m.token_ids, m.text, m.draft, m.finished) == ([1, 2, 3], "abc", "x", False)
    m = m.merged(c)
    assert (m.token_ids, m.text, m.finished, m.finish_reason, m.completion_tokens) == ([1, 2, 3, 4], "abcd", True,
                                                                                       "stop", 4)
