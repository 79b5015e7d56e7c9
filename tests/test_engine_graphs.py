"""The serving engine's bucketed decoder pass (engine/graphs.py, `--cuda-graphs`): on a CPU the same static
buffers, bucketing and padding run without capture and must give the eager engine's tokens exactly; on a GPU the
captured replay must give the tokens of the same buckets run eagerly, and (the condition for making graphs the
default) the eager engine's."""

from __future__ import annotations

import pytest
import torch

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering
from dgemma.engine import Engine, SamplingParams
from dgemma.engine.graphs import DecoderGraphs, length_buckets, row_buckets
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import write_test_tokenizer
from dgemma.text.tokenizer import Tokenizer

from .test_engine import run, tokens

C = 16
EOS = 1


def test_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert length_buckets(16, 100) == [32, 64, 100]
    assert length_buckets(256, 512) == [512]


CONFIG = preset_config("tiny", canvas_length=C, vocab_size=256)


@pytest.fixture(scope="module")
def model():
    # std 0.1 at a low temperature: prefixes settle mid-canvas, so the settled-prefix pins run too
    return random_model(CONFIG, std=0.1, seed=0)


@pytest.fixture(scope="module")
def gen():
    return default_generation(CONFIG).replace(max_denoising_steps=6, eos_token_id=[EOS], pad_token_id=0)


@pytest.fixture(scope="module")
def constraint(tmp_path_factory):
    tok = Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))
    vocab = ConstraintVocabulary.from_tokenizer(tok.backend, [EOS], [0], vocab_size=256)
    return Constraint.from_json_schema({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "minItems": 1, "maxItems": 6}, vocab)


def jobs(constraint):
    """Rows at different prompt lengths, arriving at different steps, with pins, a seeded canvas, the settled
    prefix, a constraint, top-k and greedy: every path of the step."""
    return [([5, 6, 7], SamplingParams(max_tokens=3 * C, seed=0, temperature=0.05)),
            (list(range(3, 40)), SamplingParams(max_tokens=2 * C, seed=1, pin_prefix=False)),
            ([9] * 20, SamplingParams(max_tokens=2 * C, seed=2, steering=Steering(pinned={0: 40, 5: 41}))),
            ([4, 4], SamplingParams(max_tokens=3 * C, seed=3, steering=Steering(constraint=constraint))),
            ([8, 9, 10, 11], SamplingParams(max_tokens=C, seed=4, top_k=5, temperature=0.5)),
            ([12] * 70, SamplingParams(max_tokens=2 * C, seed=5, temperature=0.0))]


def serve(model, gen, jobs_, cuda_graphs: bool, sampler: str = "exact", max_num_seqs: int = 4):
    engine = Engine(model, gen, max_num_seqs=max_num_seqs, max_model_len=160, sampler=sampler,
                    cuda_graphs=cuda_graphs)
    outputs = run(engine, jobs_, arrive_at=[0, 0, 1, 3, 5, 9])
    return [tokens(o) for o in outputs], engine


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_bucketed_pass_gives_the_eager_tokens_on_cpu(model, gen, constraint, sampler):
    eager, _ = serve(model, gen, jobs(constraint), False, sampler)
    bucketed, engine = serve(model, gen, jobs(constraint), True, sampler)
    assert bucketed == eager
    graphs = engine.runner.graphs
    used = graphs.stats()
    assert len(used) >= 3 and any(rows in (2, 4) for rows, _ in used)  # several buckets, padded rows among them
    assert not any(s["captured"] for s in used.values())  # nothing is captured on a CPU


def prompt_keys(cache, row: int, n: int) -> list[torch.Tensor]:
    """Each layer's keys at row `row`'s first n slots, read through its block table."""
    slots = torch.arange(n)
    blocks, offsets = cache.tables[row][slots // cache.block_size], slots % cache.block_size
    return [k[blocks, :, offsets].clone() for k in cache.k]


@pytest.mark.usefixtures("one_thread")
def test_padding_rows_touch_only_the_spare_block(model, gen):
    """A pass over four rows, then one over three in the same bucket: the padding row writes only the spare
    block, not the blocks of the row that sat there the pass before."""
    engine = Engine(model, gen, max_num_seqs=4, max_model_len=160, sampler="exact", cuda_graphs=True)
    runner = engine.runner
    assert runner.cache.spare_block == runner.kv.blocks.num_blocks
    for i in range(4):
        engine.add_request([5 + i] * (20 + i), SamplingParams(max_tokens=2 * C, seed=i), lambda o: None)
    engine.step()  # admission and prefill
    rows = sorted(r.row for r in engine.scheduler.running.values())
    canvas = torch.randint(0, 256, (4, C))
    with torch.inference_mode():
        runner.graphs.decode(canvas, None, runner.graphs.plan(rows))
        kept = prompt_keys(runner.cache, rows[3], 23)
        runner.graphs.decode(canvas[:3], None, runner.graphs.plan(rows[:3]))
    assert [b for b in runner.graphs.stats()] == [(4, 64)]
    for now, before in zip(prompt_keys(runner.cache, rows[3], 23), kept):
        assert torch.equal(now, before)


def test_graphs_refuse_a_cache_without_a_spare_block(model, gen):
    cache = Engine(model, gen, max_num_seqs=2, max_model_len=64).runner.cache
    with pytest.raises(ValueError, match="spare block"):
        DecoderGraphs(model, cache, 2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model():
    return random_model(CONFIG, std=0.1, seed=0).to(
        device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@cuda
def test_replay_gives_the_tokens_of_the_same_buckets_run_eagerly(cuda_model, gen, constraint):
    replayed, engine = serve(cuda_model, gen, jobs(constraint), True)
    assert all(s["captured"] for s in engine.runner.graphs.stats().values())
    static = Engine(cuda_model, gen, max_num_seqs=4, max_model_len=160, sampler="exact", cuda_graphs=True)
    static.runner.graphs.capture = False  # the same buckets, run without capture
    outputs = run(static, jobs(constraint), arrive_at=[0, 0, 1, 3, 5, 9])
    assert replayed == [tokens(o) for o in outputs]


@pytest.mark.gpu
@cuda
def test_replay_gives_the_eager_engines_tokens(cuda_model, gen, constraint):
    """The condition for turning graphs on by default: the eager engine's tokens (its masks span fewer keys,
    which may round differently; the GPU run decides)."""
    replayed, _ = serve(cuda_model, gen, jobs(constraint), True)
    eager, _ = serve(cuda_model, gen, jobs(constraint), False)
    assert replayed == eager
