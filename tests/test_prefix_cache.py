"""The engine on the paged KV cache with prefix caching (tiny random models, the exact sampler, stepped directly):
a warm request gives the tokens and the K/V a fresh engine gives, eviction under a tiny pool stays correct and
leaks no block, blocks are shared across requests with the same image, and /metrics reports it."""

from __future__ import annotations

import pytest
import torch

from dgemma.engine import Engine, SamplingParams
from dgemma.paged_cache import KVBudgetError, bytes_per_block
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.server.metrics import Metrics

C = 16
BS = 4  # block size
CHUNK = 8  # prefill chunk: the prefix cache reuses multiples of it

pytestmark = pytest.mark.usefixtures("one_thread_module")


CONFIG = dict(canvas_length=C, vocab_size=256, sliding_window=12)  # window 12: less than the longer prompts


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("tiny", **CONFIG), std=0.1, seed=0)


@pytest.fixture(scope="module")
def gen():
    return default_generation(preset_config("tiny", **CONFIG)).replace(max_denoising_steps=6)


def gib(model, blocks: int) -> float:
    return blocks * bytes_per_block(model.config, BS, model.dtype) / 2**30


def engine(model, gen, blocks: int = 200, max_num_seqs: int = 4, max_model_len: int = 128, **kw) -> Engine:
    return Engine(model, gen, max_num_seqs=max_num_seqs, max_model_len=max_model_len, sampler="exact",
                  block_size=BS, prefill_chunk=CHUNK, kv_cache_gib=gib(model, blocks), **kw)


def run(eng: Engine, jobs: list[tuple[list[int], SamplingParams]], max_steps: int = 5000) -> list[list[int]]:
    """Add the jobs, step until all finish -> tokens per job."""
    outputs: list[list] = [[] for _ in jobs]
    for (prompt, params), out in zip(jobs, outputs):
        eng.add_request(prompt, params, out.append)
    for _ in range(max_steps):
        eng.step()
        if all(o and o[-1].finished for o in outputs):
            assert all(o[-1].error is None for o in outputs)
            return [[t for x in o for t in x.token_ids] for o in outputs]
    raise AssertionError("the engine did not finish within the step budget")


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(seed: int, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, pin_prefix=False)


def prompt_kv(eng: Engine, prompt: list[int]) -> list[torch.Tensor]:
    """Encode `prompt` (one engine step with a budget past it) and read its K/V per layer from its blocks."""
    out: list = []
    request = eng.add_request(prompt, params(0, max_tokens=2 * C), out.append)
    eng.step()
    assert not eng.runner.is_prefilling(request)
    cache, n = eng.runner.cache, len(prompt)
    slots = torch.arange(n)
    blocks = cache.tables[request.row][slots // BS]
    kv = [pool[blocks, :, slots % BS].clone() for pool in cache.k + cache.v]
    eng.abort(request.request_id)
    eng.step()
    return kv


def test_the_same_request_twice_hits_the_cache_and_gives_the_same_tokens(model, gen):
    eng = engine(model, gen)
    job = (prompt_of(43, 1), params(5))
    first = run(eng, [job])[0]
    assert eng.kv_stats().hit_tokens == 0
    assert run(eng, [job])[0] == first
    assert eng.kv_stats().hit_tokens == 40  # (43 - 1) // CHUNK * CHUNK: one token is always encoded
    off = engine(model, gen, prefix_caching=False)
    assert run(off, [job])[0] == run(off, [job])[0] == first
    assert off.kv_stats().hit_tokens == 0 and off.kv_stats().evictions == 0


def test_a_shared_prefix_gives_what_a_fresh_engine_gives(model, gen):
    """A request sharing 37 tokens with an earlier one reuses 32 of them, and its tokens and its prompt's K/V are
    bit-identical to a fresh engine's (the warm request runs the cold one's chunks after the prefix)."""
    system = prompt_of(37, 2)
    a, b = system + prompt_of(20, 3), system + prompt_of(25, 4)
    warm = engine(model, gen)
    run(warm, [(a, params(1))])
    got = run(warm, [(b, params(2))])[0]
    assert warm.kv_stats().hit_tokens == 32
    assert got == run(engine(model, gen), [(b, params(2))])[0]
    fresh_kv = prompt_kv(engine(model, gen), b)
    warm_kv = prompt_kv(warm, b)
    assert all(torch.equal(x, y) for x, y in zip(warm_kv, fresh_kv))


def test_a_prompts_last_chunk_is_not_reused_by_a_longer_prompt(model, gen):
    """A prompt's last chunk is encoded in a call of its own length, which a longer prompt sharing it does not make
    (it encodes a whole chunk there), and the two calls' K/V of the same positions may differ in the last bits. So
    the last chunk's blocks are not registered: a prompt whose cached chain would pass through them (here once a
    third request has filled the rest of that chunk) gets a fresh engine's K/V, bit for bit."""
    p = prompt_of(80, 21)
    eng = engine(model, gen)
    run(eng, [(p[:52], params(1))])  # its last chunk [48, 52) fills one block in a call of 4 tokens
    run(eng, [(p[:70], params(2))])  # encodes [48, 56) in a call of 8, and its last chunk [64, 70) in one of 6
    assert eng.kv_stats().hit_tokens == 48
    warm = prompt_kv(eng, p)
    assert eng.kv_stats().hit_tokens == 48 + 64
    assert all(torch.equal(x, y) for x, y in zip(warm, prompt_kv(engine(model, gen), p)))


def test_concurrent_requests_share_blocks_and_give_their_solo_tokens(model, gen):
    system = prompt_of(50, 6)
    jobs = [(system + prompt_of(5 + i, 10 + i), params(20 + i)) for i in range(4)]
    eng = engine(model, gen)
    run(eng, [jobs[0]])
    together = run(eng, jobs[1:])
    assert eng.kv_stats().hit_tokens == 3 * 48
    assert together == [run(engine(model, gen), [job])[0] for job in jobs[1:]]


def test_n_choices_encode_their_prompt_once_and_give_their_single_requests_tokens(model, gen):
    """Four choices of one prompt, admitted in one engine step: the first encodes the prompt, the other three take
    its whole chunks from the prefix cache as they are committed and share its last chunk (its full block, and a
    copy of its partial one); each choice's tokens are those of a single request with its seed."""
    from dgemma.inputs.http import choice_params

    prompt = prompt_of(43, 11)  # chunks of 8: five whole ones, then [40, 43) in a block of its own
    choices = choice_params(params(30), 4)
    eng = engine(model, gen)
    together = run(eng, [(prompt, p) for p in choices])
    stats = eng.kv_stats()
    assert stats.query_tokens == 4 * 43 and stats.hit_tokens == 3 * 43  # the prompt is encoded once
    assert stats.used_blocks == 0
    assert together == [run(engine(model, gen), [(prompt, p)])[0] for p in choices]
    assert len({tuple(t) for t in together}) > 1  # independent generators


def test_a_request_sharing_a_prefix_being_encoded_takes_its_blocks(model, gen):
    """A request admitted while another encodes the same system prompt over several engine steps (chunked prefill)
    takes each shared chunk from the cache once the other has encoded it, and its tokens are a fresh engine's."""
    system = prompt_of(45, 12)
    a, b = (system + prompt_of(7, 13), params(1)), (system + prompt_of(9, 14), params(2))
    eng = engine(model, gen, prefill_budget=CHUNK)
    got = run(eng, [a, b])
    assert eng.kv_stats().hit_tokens == 40  # the system prompt's whole chunks
    assert got == [run(engine(model, gen), [job])[0] for job in (a, b)]


def test_eviction_under_a_tiny_pool_is_correct_and_leaks_nothing(model, gen):
    """500 short requests over a pool that holds one longest sequence (32 blocks of 4: two or three of these
    requests at once), so admission waits for blocks and cached prefixes are evicted; a sample of their tokens
    equals a roomy engine's, and at the end every block is free."""
    prefixes = [prompt_of(20, 100 + i) for i in range(7)]
    jobs = [(prefixes[i % 7] + prompt_of(1 + i % 5, 1000 + i), SamplingParams(max_tokens=3, seed=i, pin_prefix=False))
            for i in range(500)]
    tiny = engine(model, gen, blocks=32)
    outputs = []
    for at in range(0, 500, 10):  # ten waiting at a time
        outputs += run(tiny, jobs[at:at + 10])
    stats = tiny.kv_stats()
    assert stats.used_blocks == 0 and tiny.runner.kv.blocks.num_free == 32
    assert not tiny.runner.kv.tables and not tiny.runner.prefills
    assert stats.evictions > 0 and stats.hit_tokens > 0 and stats.peak_used_blocks <= 32
    roomy = engine(model, gen, blocks=400)
    sample = list(range(0, 500, 25))
    assert [outputs[i] for i in sample] == run(roomy, [jobs[i] for i in sample])


def test_a_pool_that_cannot_hold_one_sequence_is_refused(model, gen):
    with pytest.raises(KVBudgetError, match="one sequence of 128 tokens needs 32"):
        engine(model, gen, blocks=31)


def test_metrics_report_the_prefix_cache(model, gen):
    eng = engine(model, gen)
    job = (prompt_of(43, 1), params(5))
    run(eng, [job, job])  # admitted in one step: the second takes all of the first's prompt
    run(eng, [job])  # later, alone: the cached whole chunks
    text = Metrics(eng).render().decode()
    stats = eng.kv_stats()
    assert stats.hit_tokens == 43 + 40 and stats.query_tokens == 3 * 43
    assert f"dgemma_prefix_cache_hits {float(stats.hit_tokens)}" in text
    assert f"dgemma_prefix_cache_hit_rate {stats.hit_rate}" in text
    assert "dgemma_kv_blocks_total 200.0" in text and "dgemma_kv_blocks_used 0.0" in text


# -- images ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    from dgemma.io import checkpoint

    from .test_vision import make_vision_checkpoint

    return checkpoint.load(make_vision_checkpoint(tmp_path_factory.mktemp("vision") / "ckpt"), quiet=True)


def image_job(ckpt, image_seed: int, text: list[int], seed: int):
    from dgemma.images import ImageProcessorConfig, ImageTokens, PromptImages, expand_image_tokens, preprocess

    from .test_vision import BOI, EOI, IMAGE, PROCESSOR, test_image

    patches = [preprocess(test_image(24, 20, image_seed), ImageProcessorConfig(**PROCESSOR))]
    tokens = ImageTokens(BOI, IMAGE, EOI)
    prompt = expand_image_tokens([2, 3, 40, IMAGE, 41, 42] + text, patches, tokens)
    return prompt, SamplingParams(max_tokens=16, seed=seed, pin_prefix=False,
                                  images=PromptImages(ckpt.vision, tokens, [patches]))


def image_engine(ckpt) -> Engine:
    return Engine(ckpt.model, ckpt.generation.replace(max_denoising_steps=4), max_num_seqs=2, max_model_len=256,
                  sampler="exact", block_size=BS, prefill_chunk=CHUNK)


def test_requests_with_the_same_image_share_its_blocks(vision):
    common = list(range(70, 82))
    first = image_job(vision, 7, common + [50, 51, 52] * 4, seed=1)
    second = image_job(vision, 7, common + [60, 61] * 5, seed=2)
    other = image_job(vision, 8, common + [60, 61] * 5, seed=2)  # another picture, the same tokens
    assert second[0] == other[0]
    image_end = max(i for i, t in enumerate(second[0]) if t == 252) + 1
    shared = next(i for i, (x, y) in enumerate(zip(first[0], second[0])) if x != y)
    assert shared > image_end + CHUNK  # the prompts share the image and a chunk past it
    eng = image_engine(vision)
    run(eng, [first])
    got = run(eng, [second])[0]
    assert eng.kv_stats().hit_tokens == shared // CHUNK * CHUNK  # the image's blocks are reused
    assert got == run(image_engine(vision), [second])[0]
    hits = eng.kv_stats().hit_tokens
    got_other = run(eng, [other])[0]
    assert eng.kv_stats().hit_tokens - hits == 0  # the image starts in the first chunk: nothing reusable
    assert got_other == run(image_engine(vision), [other])[0]


def test_choices_of_an_image_prompt_encode_it_once_and_give_their_single_tokens(vision):
    import dataclasses

    prompt, first = image_job(vision, 7, list(range(70, 82)) + [50, 51, 52] * 4, seed=1)
    jobs = [(prompt, first), (prompt, dataclasses.replace(first, seed=2))]
    eng = image_engine(vision)
    together = run(eng, jobs)
    assert eng.kv_stats().hit_tokens == len(prompt)  # the second choice encoded nothing, the image included
    assert together == [run(image_engine(vision), [job])[0] for job in jobs]
