"""Configs as transformers writes and reads them: sparse per_layer_config, generation_config.json without EOS or
with keys transformers refuses, the release's max_new_tokens, and the sampling flags that reach those fields."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.config import ConfigError, GenerationConfig, TextConfig
from dgemma.generate import generate, left_pad

from .conftest import TINY_TEXT, make_reference_checkpoint

transformers = pytest.importorskip("transformers")

SLIDING, FULL = "sliding_attention", "full_attention"
EOS_AND_PAD = {"eos_token_id": 1, "pad_token_id": 0}

# text configs built the way transformers' own tests build them: the full-attention layers' overrides equal the
# base (save_pretrained writes per_layer_config {}), differ in one field only, or are given explicitly
PER_LAYER_VARIANTS = {
    "overrides_equal_base": dict(TINY_TEXT, global_head_dim=16, num_global_key_value_heads=2),
    "kv_heads_only": dict(TINY_TEXT, global_head_dim=16, num_global_key_value_heads=1),
    "head_dim_only": dict(TINY_TEXT, global_head_dim=32, num_global_key_value_heads=2),
    "no_global_kv_heads": dict(TINY_TEXT, global_head_dim=32, num_global_key_value_heads=None),
    "explicit_empty": dict(TINY_TEXT, per_layer_config={}),
    "explicit_sliding_and_full": dict(TINY_TEXT, per_layer_config={0: {"head_dim": 8}, 1: {"num_key_value_heads": 1},
                                                                   2: {"num_key_value_heads": 1}}),
}


def _reference_dims(text: dict) -> list[tuple[int, int]]:
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    cfg = DiffusionGemmaTextConfig(**copy.deepcopy(text))
    return [(c.head_dim, c.num_key_value_heads) for c in cfg.per_layer_config]


def _our_dims(text: dict) -> list[tuple[int, int]]:
    cfg = TextConfig.from_hf(copy.deepcopy(text))
    return [(cfg.layer_head_dim(i), cfg.layer_kv_heads(i)) for i in range(cfg.num_hidden_layers)]


JSON_VARIANTS = {
    # as the release writes it: no per_layer_config, global_* fields
    "release_style": {k: v for k, v in TINY_TEXT.items()},
    "release_style_no_globals": {k: v for k, v in TINY_TEXT.items()
                                 if k not in ("global_head_dim", "num_global_key_value_heads")},
    # as save_pretrained writes it: the global_* fields are gone, per_layer_config holds the differences
    "empty_with_stale_globals": dict(TINY_TEXT, per_layer_config={}),
    "null": dict(TINY_TEXT, per_layer_config=None),
    "zero_padded_keys": dict(TINY_TEXT, per_layer_config={"01": {"head_dim": 32}, "02": {"head_dim": 32}}),
    "kv_only": dict(TINY_TEXT, per_layer_config={"1": {"num_key_value_heads": 1}, "2": {"num_key_value_heads": 1}}),
    "sliding_override": dict(TINY_TEXT, per_layer_config={"0": {"head_dim": 8, "num_key_value_heads": 4}}),
    "override_equal_to_base": dict(TINY_TEXT, per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 2},
                                                                "2": {"head_dim": 16}}),
}


@pytest.mark.parametrize("case", sorted(JSON_VARIANTS))
def test_per_layer_dims_match_transformers(case):
    text = JSON_VARIANTS[case]
    assert _our_dims(text) == _reference_dims(text)


@pytest.mark.parametrize("case", sorted(PER_LAYER_VARIANTS))
def test_saved_per_layer_config_matches_transformers(case):
    text = PER_LAYER_VARIANTS[case]
    assert _our_dims(text) == _reference_dims(text)


@pytest.fixture(scope="module", params=sorted(PER_LAYER_VARIANTS))
def variant(request, tmp_path_factory):
    path = make_reference_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt",
                                     text=PER_LAYER_VARIANTS[request.param], canvas_length=8, std=0.1, seed=2,
                                     vision=False, generation=EOS_AND_PAD)
    ours = checkpoint.load(path, quiet=True)
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    return request.param, path, ours, ref


def test_variant_loads_and_generates_the_reference_tokens(variant):
    """Every variant loads (its per_layer_config may be {}), and a batch whose rows have different lengths gets the
    reference's tokens over three canvases."""
    _, path, ours, ref = variant
    C = ours.config.canvas_length
    written = json.loads((path / "config.json").read_text())["text_config"]
    assert "per_layer_config" in written and "global_head_dim" not in written
    prompts = [[5, 9, 17, 33, 65, 129], [40, 41]]
    gen = ours.generation.replace(max_new_tokens=3 * C, max_denoising_steps=5, t_min=0.4, t_max=0.8)
    torch.manual_seed(11)
    got = generate(ours.model, prompts, gen)
    tokens, valid = left_pad(prompts, 0)
    torch.manual_seed(11)
    out = ref.generate(tokens, attention_mask=valid.long(), max_new_tokens=3 * C, max_denoising_steps=5,
                       t_min=0.4, t_max=0.8)
    want = []
    for row in out.sequences[:, tokens.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t == 1), None)
        want.append(row if cut is None else row[: cut + 1])
    assert got.token_ids == want


BAD_PER_LAYER = {
    # transformers cannot build these either: its RoPE needs one head size per layer type
    "full layers differ": ({"1": {"head_dim": 32}}, "full_attention layers differ"),
    "sliding layers differ": (None, "sliding_attention layers differ"),
    "key not an index": ({"full": {"head_dim": 32}}, "layer indices"),
    "index out of range": ({"3": {"head_dim": 32}}, "out of range"),
    "override the model reads globally": ({"1": {"intermediate_size": 64}, "2": {"intermediate_size": 64}},
                                          "intermediate_size"),
    "skip a sublayer": ({"1": {"skip": ["mlp"]}}, "skip"),
}


@pytest.mark.parametrize("case", sorted(BAD_PER_LAYER))
def test_per_layer_config_dgemma_cannot_apply_is_refused(case):
    per_layer, words = BAD_PER_LAYER[case]
    text = dict(TINY_TEXT, per_layer_config=per_layer)
    if per_layer is None:  # two sliding layers, one overridden
        text = dict(TINY_TEXT, num_hidden_layers=4, layer_types=[SLIDING, SLIDING, FULL, FULL],
                    per_layer_config={"0": {"head_dim": 8}})
    with pytest.raises(ConfigError, match=words) as info:
        TextConfig.from_hf(text)
    assert "per_layer_config" in str(info.value) and "\n" not in str(info.value)


def test_override_equal_to_the_global_value_is_dropped_as_transformers_does():
    text = dict(TINY_TEXT, per_layer_config={"1": {"intermediate_size": 128}, "2": {"sliding_window": 8}})
    assert _our_dims(text) == _reference_dims(text)


# ---- generation_config.json -----------------------------------------------------------------------------------------

def test_generation_config_without_eos_stops_at_config_eos_and_says_so(tmp_path):
    """save_pretrained of a model built from a config writes no eos_token_id; transformers then never stops at EOS
    (it does not fall back to config.json's). dgemma stops at config.json's eos and says so in one line; a missing
    file gets the same rule. (This file was refused until issue 32: every freshly saved checkpoint met it.)"""
    path = make_reference_checkpoint(tmp_path / "ckpt", vision=False, generation={"eos_token_id": None})
    assert "eos_token_id" not in json.loads((path / "generation_config.json").read_text())
    assert transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path).generation_config.eos_token_id is None
    gen, notice = GenerationConfig.load(path / "generation_config.json", TextConfig.from_hf(TINY_TEXT))
    assert gen.eos_token_id == [1]
    assert "no eos_token_id" in notice and "config.json's eos_token_id [1]" in notice and "--no-eos" in notice
    assert "\n" not in notice
    assert checkpoint.load(path, quiet=True).generation.eos_token_id == [1]
    (path / "generation_config.json").unlink()
    gen, notice = GenerationConfig.load(path / "generation_config.json", TextConfig.from_hf(TINY_TEXT))
    assert gen.eos_token_id == [1] and notice.startswith("no generation_config.json")


def test_gemma4_vocabulary_without_eos_stops_at_the_release_eos_ids(tmp_path):
    text = TextConfig.from_hf(dict(TINY_TEXT, vocab_size=262_144))
    gen, notice = GenerationConfig.load(tmp_path / "generation_config.json", text)
    assert gen.eos_token_id == [1, 50, 106] and "release" in notice
    with pytest.raises(ConfigError, match="empty list"):
        GenerationConfig.from_hf({"eos_token_id": []})


@pytest.mark.parametrize("extra", [{"top_k": 64}, {"temperature": 0.5}, {"do_sample": True}, {"typo_t_mni": 0.1}])
def test_keys_transformers_refuses_are_refused(extra):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    raw = dict(EOS_AND_PAD, **extra)
    with pytest.raises(ValueError, match="Unexpected kwargs"):
        DiffusionGemmaGenerationConfig(**copy.deepcopy(raw))
    with pytest.raises(ConfigError, match=f"unknown keys {next(iter(extra))}"):
        GenerationConfig.from_hf(raw, where="generation_config.json")


def test_keys_transformers_accepts_are_accepted():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    raw = dict(EOS_AND_PAD, max_length=100, cache_implementation="static", bos_token_id=2, disable_compile=True,
               transformers_version="5.23.0", _from_model_config=False, return_dict_in_generate=True,
               sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2})
    DiffusionGemmaGenerationConfig(**copy.deepcopy(raw))
    assert GenerationConfig.from_hf(raw).entropy_bound == 0.2


@pytest.mark.parametrize("sampler, words", [
    ({"_cls_name": "TopKSamplerConfig", "entropy_bound": 0.1}, "'TopKSamplerConfig' is not implemented"),
    ({"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1, "k": 3}, "unknown keys k"),
    ("entropy", "sampler_config must be an object"),
])
def test_sampler_dgemma_does_not_implement_is_refused(sampler, words):
    with pytest.raises(ConfigError, match=words) as info:
        GenerationConfig.from_hf(dict(EOS_AND_PAD, sampler_config=sampler), where="generation_config.json")
    assert str(info.value).startswith("generation_config.json: ") and "\n" not in str(info.value)


def test_release_max_new_tokens_is_not_applied():
    """The release's file says max_new_tokens 256 (and transformers defaults to 256); serve ignores it as vLLM
    does, and so do generate and chat: they run until EOS or the context limit unless given --max-new-tokens."""
    gen = GenerationConfig.from_hf(dict(EOS_AND_PAD, max_new_tokens=256, max_length=300))
    assert gen.max_new_tokens is None
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig.from_hf(dict(EOS_AND_PAD, max_new_tokens=0))


def _cli_tokens(capsys, args) -> list[int]:
    from dgemma.cli import main

    assert main(args) == 0
    return json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]


def test_generate_ignores_the_files_max_new_tokens(tmp_path, capsys):
    text = dict(TINY_TEXT, max_position_embeddings=40)  # the context limit ends an EOS-less run: 4 canvases of 8
    capped = make_reference_checkpoint(tmp_path / "capped", text=text, canvas_length=8, vision=False,
                                       generation={"max_new_tokens": 4, "eos_token_id": 255})
    plain = make_reference_checkpoint(tmp_path / "plain", text=text, canvas_length=8, vision=False,
                                      generation={"eos_token_id": 255})
    args = ["--prompt-ids", "5,6,7", "--max-denoising-steps", "3", "--seed", "1", "--device", "cpu", "--json"]
    got = _cli_tokens(capsys, ["generate", "--model", str(capped)] + args)
    assert len(got) > 4
    assert got == _cli_tokens(capsys, ["generate", "--model", str(plain)] + args)
    assert len(_cli_tokens(capsys, ["generate", "--model", str(capped), "--max-new-tokens", "4"] + args)) == 4


# ---- sampling flags -------------------------------------------------------------------------------------------------

def test_threshold_flags_set_the_early_stop(tmp_path, capsys):
    import argparse

    from dgemma.cli import main
    from dgemma.cli_common import add_sampling_args, generation_config

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--stability-threshold", "0", "--confidence-threshold", "2.5", "--greedy"])
    gen = generation_config(args, GenerationConfig())
    assert (gen.stability_threshold, gen.confidence_threshold, args.greedy) == (0, 2.5, True)
    path = make_reference_checkpoint(tmp_path / "ckpt", canvas_length=8, vision=False)
    for flag, value in (("--confidence-threshold", "0"), ("--stability-threshold", "-1")):
        capsys.readouterr()
        assert main(["generate", "--model", str(path), "--prompt-ids", "3,4", flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], err
    # a generous confidence threshold stops every canvas after its first step
    base = ["generate", "--model", str(path), "--prompt-ids", "3,4", "--max-new-tokens", "16", "--seed", "0",
            "--max-denoising-steps", "6", "--device", "cpu", "--json"]
    assert main(base + ["--stability-threshold", "0", "--confidence-threshold", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["denoising_steps"] == 2
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["denoising_steps"] > 2


def test_greedy_generate_is_the_engines_temperature_zero():
    """generate(greedy=True) samples the argmax exactly as a request with temperature 0 does in the engine."""
    from dgemma.engine import Engine, SamplingParams
    from dgemma.presets import default_generation, preset_config, random_model

    cfg = preset_config("tiny", canvas_length=8, vocab_size=128)
    model = random_model(cfg, std=0.1, seed=0)
    gen = default_generation(cfg).replace(max_denoising_steps=5)
    prompt = [5, 6, 7, 8]
    greedy = generate(model, [prompt], gen.replace(max_new_tokens=24), generator=torch.Generator().manual_seed(3),
                      greedy=True)
    sampled = generate(model, [prompt], gen.replace(max_new_tokens=24), generator=torch.Generator().manual_seed(3))
    assert greedy.token_ids != sampled.token_ids
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=128)
    outputs = []
    engine.add_request(prompt, SamplingParams(max_tokens=24, seed=3, temperature=0, pin_prefix=False), outputs.append)
    for _ in range(500):
        if outputs and outputs[-1].finished:
            break
        engine.step()
    assert [t for o in outputs for t in o.token_ids] == greedy.token_ids[0]


def test_greedy_flag_reaches_generate(tmp_path, capsys):
    from dgemma.cli import main

    path = make_reference_checkpoint(tmp_path / "ckpt", canvas_length=8, std=0.1, vision=False)
    args = ["generate", "--model", str(path), "--prompt-ids", "3,4,5", "--max-new-tokens", "16", "--seed", "4",
            "--max-denoising-steps", "4", "--device", "cpu", "--json"]
    got = _cli_tokens(capsys, args + ["--greedy"])
    ours = checkpoint.load(path, quiet=True)
    torch.manual_seed(4)
    want = generate(ours.model, [[3, 4, 5]], ours.generation.replace(max_new_tokens=16, max_denoising_steps=4),
                    greedy=True)
    assert got == want.token_ids[0]
    assert got != _cli_tokens(capsys, args)


def test_variant_rows_stopping_at_different_steps_match_the_reference(variant):
    """Early stops on: a confidence threshold at which the two rows stop at different steps of a canvas (searched on
    dgemma's side, then checked against the reference), so stopped rows are skipped while others denoise on."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    _, _, ours, ref = variant
    C = ours.config.canvas_length
    prompts = [[11, 12, 13, 14], [50, 60, 70, 80, 90, 100, 110]]
    base = ours.generation.replace(max_new_tokens=2 * C, max_denoising_steps=8, entropy_bound=4.0, t_min=0.4,
                                   t_max=0.8, stability_threshold=0)
    for confidence in [x / 20 for x in range(60, 115)]:
        gen = base.replace(confidence_threshold=confidence)
        torch.manual_seed(5)
        got = generate(ours.model, prompts, gen)
        first = [steps[0] for steps in got.steps_per_canvas]
        if first[0] != first[1] and max(first) < 8:
            break
    else:
        pytest.fail("no threshold found at which the rows stop at different steps")
    tokens, valid = left_pad(prompts, 0)
    torch.manual_seed(5)
    out = ref.generate(tokens, attention_mask=valid.long(), max_new_tokens=2 * C, max_denoising_steps=8, t_min=0.4,
                       t_max=0.8, sampler_config=EntropyBoundSamplerConfig(entropy_bound=4.0),
                       confidence_threshold=confidence, stability_threshold=0)
    want = []
    for row in out.sequences[:, tokens.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t == 1), None)
        want.append(row if cut is None else row[: cut + 1])
    assert got.token_ids == want
