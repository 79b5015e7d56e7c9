"""The vision tower against the reference (transformers 5.23.0): image features, preprocessing and generate.

Tiny random checkpoints carry a small Gemma 4 vision tower (patch 4, pooling 2) with the release's options:
standardised soft tokens, clipped linears and bidirectional attention among an image's soft tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgemma.io import checkpoint

from .conftest import TINY_TEXT

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_thread_module")

VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2,
              position_embedding_size=64, standardize=True, use_clipped_linears=True)
PROCESSOR = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
BOI, IMAGE, EOI = 251, 252, 253  # above the test tokenizer's 251 tokens, inside the model's vocabulary of 256


def make_vision_checkpoint(path: Path, seed: int = 3) -> Path:
    """A random reference model with a vision tower, saved with save_pretrained, plus processor_config.json."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(TINY_TEXT, initializer_range=0.05, use_bidirectional_attention="vision")
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=8, initializer_range=0.05,
                               boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # the init leaves these at their identity values; random ones test that they are applied
        tower = model.model.encoder.vision_tower
        tower.std_bias.normal_(0, 0.5)
        tower.std_scale.uniform_(0.5, 1.5)
        for name, buf in tower.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buf.fill_(-float(torch.empty(()).uniform_(0.5, 2.0)))
            elif name.endswith(("input_max", "output_max")):
                buf.fill_(float(torch.empty(()).uniform_(0.5, 2.0)))
    model.save_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update({"eos_token_id": 1, "pad_token_id": 0})
    (path / "generation_config.json").write_text(json.dumps(gen))
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {
        **PROCESSOR, "image_processor_type": "Gemma4ImageProcessor", "resample": 3}}))
    return path


def test_image(width: int, height: int, seed: int, mode: str = "RGB"):
    """A smooth random picture (a gradient plus noise), so resizing has something to interpolate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = PIL.fromarray(pixels, "RGB")
    return image.convert(mode)


test_image.__test__ = False


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_vision_checkpoint(tmp_path_factory.mktemp("vision") / "ckpt")
    ours = checkpoint.load(path, quiet=True)
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    return path, ours, ref


def reference_pixels(images):
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        Gemma4ImageProcessorPil,
    )

    return Gemma4ImageProcessorPil(**PROCESSOR)(images, return_tensors="pt")


@torch.no_grad()
def test_image_features_match_reference(pair):
    _, ours, ref = pair
    images = [test_image(40, 28, 0), test_image(17, 61, 1)]
    batch = reference_pixels(images)
    want = ref.model.encoder.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
    real = [(pv[pos[:, 0] >= 0], pos[pos[:, 0] >= 0]) for pv, pos in zip(batch["pixel_values"],
                                                                          batch["image_position_ids"])]
    got = ours.vision.features(real)
    assert got.shape == want.shape == (sum(batch["num_soft_tokens_per_image"]), TINY_TEXT["hidden_size"])
    assert (got - want).abs().max() < 1e-5


def test_preprocessing_matches_reference(tmp_path):
    from dgemma.image_files import decode_image
    from dgemma.images import ImageProcessorConfig, preprocess

    cfg = ImageProcessorConfig(**PROCESSOR)
    # sizes that are scaled up, scaled down, left as they are (32x24 fits the grid), and thin in either direction;
    # modes with transparency (composited on white), a palette and grey
    cases = [(40, 28, "RGB"), (300, 170, "RGBA"), (32, 24, "RGB"), (9, 200, "P"), (211, 6, "L"), (64, 64, "LA")]
    for i, (w, h, mode) in enumerate(cases):
        image = test_image(w, h, i, mode)
        if mode == "RGBA":
            alpha = np.asarray(image)[..., 3].copy()
            alpha[: h // 2] = 40
            image.putalpha(PIL.fromarray(alpha))
        path = tmp_path / f"{i}.png"
        image.save(path)
        want = reference_pixels([PIL.open(path)])
        got = preprocess(decode_image(path.read_bytes()), cfg)
        n = got.pixels.shape[0]
        assert got.num_soft_tokens == want["num_soft_tokens_per_image"][0]
        assert torch.equal(got.positions, want["image_position_ids"][0, :n])
        assert (want["image_position_ids"][0, n:] == -1).all()
        assert torch.equal(got.pixels, want["pixel_values"][0, :n].float()), (w, h, mode)


def _reference_generate(ref, prompt, images, seed, max_new, steps):
    batch = reference_pixels(images)
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                       image_position_ids=batch["image_position_ids"], mm_token_type_ids=(ids == IMAGE).long(),
                       max_new_tokens=max_new, max_denoising_steps=steps, t_min=0.4, t_max=0.8)
    row = out.sequences[0, ids.shape[1]:].tolist()[:max_new]
    cut = next((i for i, t in enumerate(row) if t == 1), None)
    return row if cut is None else row[: cut + 1]


@pytest.mark.parametrize("sizes", [[(40, 28)], [(40, 28), (23, 57)]], ids=["one", "two"])
def test_generate_with_images_matches_reference(pair, sizes):
    from dgemma.generate import generate
    from dgemma.images import (
        ImageProcessorConfig,
        ImageTokens,
        PromptImages,
        expand_image_tokens,
        preprocess,
    )

    _, ours, ref = pair
    images = [test_image(w, h, 10 + i) for i, (w, h) in enumerate(sizes)]
    patches = [preprocess(im, ImageProcessorConfig(**PROCESSOR)) for im in images]
    # text, an image placeholder per image, more text (the placeholders as the chat template writes them)
    raw = [2, 3, 40, 41] + [t for i in range(len(images)) for t in (IMAGE, 50 + i)] + [60, 61, 4]
    prompt = expand_image_tokens(raw, patches, ImageTokens(BOI, IMAGE, EOI))
    assert prompt.count(IMAGE) == sum(p.num_soft_tokens for p in patches) > 8  # past the sliding window
    want = _reference_generate(ref, prompt, images, seed=5, max_new=24, steps=6)
    torch.manual_seed(5)
    gen = ours.generation.replace(max_new_tokens=24, max_denoising_steps=6, t_min=0.4, t_max=0.8)
    got = generate(ours.model, [prompt], gen, images=PromptImages(ours.vision, ImageTokens(BOI, IMAGE, EOI),
                                                                 [patches]))
    assert got.token_ids[0] == want
    # the images change the answer (the test would pass without them otherwise)
    torch.manual_seed(5)
    assert generate(ours.model, [prompt], gen).token_ids[0] != want


def add_image_tokenizer(path: Path) -> Path:
    """The byte-level test tokenizer plus the three image tokens as special tokens (ids BOI, IMAGE, EOI)."""
    from tokenizers import AddedToken, Tokenizer

    from dgemma.testing import write_test_tokenizer

    write_test_tokenizer(path / "tok")
    backend = Tokenizer.from_file(str(path / "tok" / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|image>", "<|image|>", "<image|>")])
    assert [backend.token_to_id(t) for t in ("<|image>", "<|image|>", "<image|>")] == [BOI, IMAGE, EOI]
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text((path / "tok" / "tokenizer_config.json").read_text())
    return path


@pytest.fixture(scope="module")
def cli_ckpt(pair, tmp_path_factory):
    path, _, ref = pair
    add_image_tokenizer(path)
    pictures = tmp_path_factory.mktemp("pictures")
    files = []
    for i, (w, h) in enumerate([(40, 28), (23, 57)]):
        files.append(pictures / f"{i}.png")
        test_image(w, h, 10 + i).save(files[-1])
    return path, ref, files


def _run(capsys, args):
    from dgemma.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_with_two_images_matches_reference(cli_ckpt, capsys):
    path, ref, files = cli_ckpt
    raw = [2, 3, 40, IMAGE, 50, IMAGE, 51, 60]
    code, out, _ = _run(capsys, ["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, raw)),
                                 "--image", str(files[0]), "--image", str(files[1]), "--max-new-tokens", "24",
                                 "--max-denoising-steps", "6", "--seed", "5", "--t-min", "0.4", "--t-max", "0.8",
                                 "--device", "cpu", "--json"])
    assert code == 0
    from dgemma.image_files import read_image
    from dgemma.images import ImageProcessorConfig, ImageTokens, expand_image_tokens, preprocess

    images = [read_image(f) for f in files]
    prompt = expand_image_tokens(raw, [preprocess(im, ImageProcessorConfig(**PROCESSOR)) for im in images],
                                 ImageTokens(BOI, IMAGE, EOI))
    want = _reference_generate(ref, prompt, [PIL.open(f) for f in files], seed=5, max_new=24, steps=6)
    assert json.loads(out)["outputs"][0]["token_ids"] == want


def test_cli_chat_prompt_puts_the_image_before_the_text(cli_ckpt, capsys):
    path, _, files = cli_ckpt
    code, out, _ = _run(capsys, ["generate", "--model", str(path), "--prompt", "what is this?", "--chat",
                                 "--image", str(files[0]), "--max-new-tokens", "8", "--max-denoising-steps", "2",
                                 "--device", "cpu", "--json"])
    assert code == 0 and json.loads(out)["outputs"][0]["token_ids"]


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    buf = path.with_suffix(".tmp")
    PIL.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def test_bad_images_exit_2_with_one_line(cli_ckpt, capsys, tmp_path):
    path, _, files = cli_ckpt
    good = files[0].read_bytes()
    bad = {  # what the one line says: (file, its bytes)
        "corrupt": (tmp_path / "corrupt.png", good[:60] + bytes(200) + good[260:]),
        "truncated": (tmp_path / "truncated.png", good[: len(good) // 2]),
        "supported format": (tmp_path / "notes.txt", b"just some text, not a picture\n"),
        "supported format ": (tmp_path / "pic.ico", None),
        "too large": (_bomb_png(tmp_path / "bomb.png", 7_000, 7_000), None),  # past the limit Pillow warns at
        "no such image": (tmp_path / "nowhere.png", None),
    }
    PIL.new("RGB", (16, 16)).save(bad["supported format "][0], "ICO")
    for name, (file, data) in bad.items():
        if data is not None:
            file.write_bytes(data)
        code, out, err = _run(capsys, ["generate", "--model", str(path), "--prompt-ids", f"2,{IMAGE},40",
                                       "--image", str(file), "--max-new-tokens", "8", "--device", "cpu"])
        assert code == 2 and out == "", name
        lines = err.strip().splitlines()
        assert str(file) in lines[-1] and name.strip() in lines[-1], (name, err)
        assert not any("Traceback" in line for line in lines), name
    # an image too wide for this tower's 64 position embeddings once resized (280x8 pixels: 70 x 2 patches)
    wide = tmp_path / "wide.png"
    test_image(211, 6, 7).save(wide)
    code, _, err = _run(capsys, ["generate", "--model", str(path), "--prompt-ids", f"2,{IMAGE},40", "--image",
                                 str(wide), "--device", "cpu"])
    assert code == 2 and "position embeddings" in err.strip().splitlines()[-1]
    # the placeholder count must match the images
    code, _, err = _run(capsys, ["generate", "--model", str(path), "--prompt-ids", "2,40", "--image", str(files[0]),
                                 "--device", "cpu"])
    assert code == 2 and "0 image placeholders for 1 images" in err


def test_image_for_a_model_without_a_tower(cli_ckpt, capsys, tmp_path):
    from dgemma.testing import write_tiny_checkpoint

    _, _, files = cli_ckpt
    plain = write_tiny_checkpoint(tmp_path / "plain")  # dgemma's own tiny preset has no tower
    for model, flags, why in [(plain, [], "no vision tower"), (cli_ckpt[0], ["--no-vision"], "--no-vision")]:
        code, _, err = _run(capsys, ["generate", "--model", str(model), "--prompt-ids", "2,40", *flags,
                                     "--image", str(files[0]), "--device", "cpu"])
        assert code == 2 and why in err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def image_server(cli_ckpt):
    from dgemma.engine import Engine
    from dgemma.images import ImageSupport
    from dgemma.server import ServerThread, Serving, build_app
    from dgemma.text.tokenizer import Tokenizer

    path, _, files = cli_ckpt
    ckpt = checkpoint.load(path, quiet=True)
    tokenizer = Tokenizer.from_dir(path)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=2, max_model_len=256).start()
    serving = Serving(engine, tokenizer, "vision-test", images=ImageSupport.of(ckpt),
                      allowed_media=files[0].parent, max_images=2)
    srv = ServerThread(build_app(serving)).start()
    yield srv, tokenizer, files
    srv.stop()
    engine.stop()


def _data_url(file: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode()


def _image_chat(url: str, *extra, **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, *extra, {"type": "text", "text": "what is it?"}]
    return dict(model="vision-test", messages=[{"role": "user", "content": parts}], max_tokens=8, seed=3, **kw)


def test_server_takes_images_as_data_urls_and_allowed_paths(image_server):
    import httpx

    srv, tokenizer, files = image_server
    post = lambda body: httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    first = post(_image_chat(_data_url(files[0])))
    assert first.status_code == 200, first.text
    # the prompt holds the rendered chat with the image placeholder expanded to boi, 35 image tokens, eoi
    chat_ids = tokenizer.encode_chat([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": "what is it?"}]}])
    assert chat_ids.count(IMAGE) == 1
    from dgemma.image_files import read_image
    from dgemma.images import ImageProcessorConfig, preprocess

    soft = preprocess(read_image(files[0]), ImageProcessorConfig(**PROCESSOR)).num_soft_tokens
    assert soft == 70  # 40x28 scaled to 80x56: 20 x 14 patches, pooled 2 x 2
    assert first.json()["usage"]["prompt_tokens"] == len(chat_ids) - 1 + (1 + soft + 1)
    same = post(_image_chat(str(files[0])))  # the same picture by path, inside --allowed-local-media
    assert same.status_code == 200 and same.json()["choices"] == first.json()["choices"]
    other = post(_image_chat(_data_url(files[1])))
    assert other.status_code == 200 and other.json()["choices"] != first.json()["choices"]


def test_server_refuses_bad_images_with_400(image_server, tmp_path):
    import httpx

    srv, _, files = image_server
    outside = tmp_path / "outside.png"
    outside.write_bytes(files[0].read_bytes())
    good = {"type": "image_url", "image_url": {"url": _data_url(files[0])}}
    cases = {
        "no network fetches": _image_chat("https://example.com/cat.png"),
        "outside the allowed media": _image_chat(str(outside)),
        "not valid base64": _image_chat("data:image/png;base64,@@@"),
        "corrupt or truncated": _image_chat(_data_url(files[0])[:22 + 400]),  # the first 300 bytes
        "more than this server's limit of 2": _image_chat(_data_url(files[0]), good, good),
    }
    for expected, body in cases.items():
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, (expected, r.text)
        error = r.json()["error"]
        assert expected in error["message"] and error["param"] == "messages", (expected, error)


def test_server_without_a_tower_refuses_images(cli_ckpt):
    import httpx

    from dgemma.engine import Engine
    from dgemma.server import ServerThread, Serving, build_app
    from dgemma.text.tokenizer import Tokenizer

    path, _, files = cli_ckpt
    ckpt = checkpoint.load(path, quiet=True, vision=False)
    tokenizer = Tokenizer.from_dir(path)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=1, max_model_len=128)
    srv = ServerThread(build_app(Serving(engine, tokenizer, "vision-test"))).start()
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json=_image_chat(_data_url(files[0])), timeout=60)
        assert r.status_code == 400 and "cannot take images" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_save_keeps_the_tower_byte_for_byte(pair, tmp_path):
    from safetensors import safe_open

    path, ours, _ = pair
    out = checkpoint.save(tmp_path / "saved", ours.model, ours.config, ours.generation,
                          passthrough=ours.passthrough, vision_config=ours.vision_config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["vision_config"] == json.loads((path / "config.json").read_text())["vision_config"]
    assert saved["text_config"]["use_bidirectional_attention"] == "vision"
    with safe_open(str(path / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        names = [n for n in a.keys() if n.startswith(checkpoint.VISION_PREFIXES)]
        assert len(names) == len(ours.vision.state_dict()) and set(names) <= set(b.keys())
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in names)
    again = checkpoint.load(out, quiet=True)
    image = test_image(30, 30, 4)
    from dgemma.images import ImageProcessorConfig, preprocess

    p = preprocess(image, ImageProcessorConfig(**PROCESSOR))
    assert torch.equal(again.vision.features([(p.pixels, p.positions)]), ours.vision.features([(p.pixels, p.positions)]))


def test_chat_image_command_sends_the_picture_with_the_next_message(cli_ckpt, capsys, monkeypatch):
    path, _, files = cli_ckpt
    lines = iter([f"/image {files[0]}", "/image /no/such.png", "what is this?", "and now?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    import dgemma.generate

    real = dgemma.generate.generate
    monkeypatch.setattr(dgemma.generate, "generate",
                        lambda model, prompts, gen, **kw: seen.append((prompts[0], kw.get("images"))) or real(
                            model, prompts, gen, **kw))
    code, out, err = _run(capsys, ["chat", "--model", str(path), "--max-new-tokens", "8",
                                   "--max-denoising-steps", "2", "--device", "cpu"])
    assert code == 0 and out.count("model>") == 2
    assert "no such image file" in err  # a bad /image is one line, and the chat goes on
    (first, images1), (second, images2) = seen
    assert first.count(IMAGE) == 70 and [len(r) for r in images1.rows] == [1]
    assert second.count(IMAGE) == 70 and [len(r) for r in images2.rows] == [1]  # the picture stays in the history


def test_a_tower_dgemma_cannot_run_still_loads_text_only_with_vision_off(tmp_path):
    """--no-vision does not read the vision_config, so a tower dgemma cannot build does not stop a text-only load;
    with vision on, the config is refused in one line."""
    import json

    from dgemma.config import ConfigError
    from dgemma.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"] = {"model_type": "gemma4_vision", "output_proj_dims": 8}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="output_proj_dims"):
        checkpoint.load(path, quiet=True)
    ck = checkpoint.load(path, quiet=True, vision=False)
    assert ck.vision is None and ck.config.vision is None


@pytest.mark.parametrize("command", [["convert"], ["quantize", "--format", "int4", "--group-size", "32"]])
def test_convert_and_quantize_copy_the_tower_through(cli_ckpt, capsys, tmp_path, command):
    """They do not build the tower (it is neither converted nor quantized) but write its tensors unchanged."""
    from safetensors import safe_open

    path = cli_ckpt[0]
    out = tmp_path / "out"
    code, printed, err = _run(capsys, [command[0], "--model", str(path), "--out", str(out), *command[1:]])
    assert code == 0, err
    if command[0] == "quantize":  # it says what it left alone
        assert "the vision tower (" in printed and "tensors) copied unquantized" in printed
    with safe_open(str(path / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        names = [n for n in a.keys() if n.startswith(checkpoint.VISION_PREFIXES)]
        assert names and all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in names)
    assert checkpoint.load(out, quiet=True).vision is not None
