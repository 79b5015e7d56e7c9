"""Load and save checkpoints in the released HF format (config.json, generation_config.json, safetensors shards).

Tensors are read through a memory map of each safetensors file. When the file's dtype is the compute dtype, the
parameter *is* the mapped memory (copy-on-write, nothing copied); otherwise each tensor is converted and its
mapped pages are dropped at once, so peak memory stays near the size of the converted weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, GenerationConfig, ModelConfig, read_json
from ..model import DiffusionGemma
from ..model.vision import Vision
from ..quant import formats as quant_formats
from ..quant import fp8 as quant_fp8
from ..quant import int4 as quant_int4
# CheckpointError and SafetensorsFile are dgemma.io.checkpoint's names too
from .output_dir import commit, previous_output, staging_dir
from .safetensors_file import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, CheckpointError, SafetensorsFile, drop_pages

DECODER = "model.decoder."
ENCODER_TEXT = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
VISION_ROOT = "model.encoder."  # Vision's parameter names are the release's after this prefix
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model")

@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its configs, and the source directory (tokenizer files live there)."""

    model: DiffusionGemma
    config: ModelConfig
    generation: GenerationConfig
    path: Path
    passthrough: dict[str, tuple[SafetensorsFile, str]] = field(default_factory=dict)  # vision tensors kept as-is
    vision_config: dict | None = None
    vision: Vision | None = None  # the loaded tower (None: none in the checkpoint, or loaded with vision=False)
    no_images_reason: str | None = None  # why the model takes no images (None: it takes them)


def _index_files(path: Path) -> dict[str, SafetensorsFile]:
    """name -> file, for a single file or a sharded checkpoint."""
    index_path = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index_path.is_file():
        try:
            index = read_json(index_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty weight_map")
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, fname in weight_map.items():
            shard = path / str(fname)
            if shard.name != fname or fname.startswith("."):
                raise CheckpointError(f"{index_path}: shard name {fname!r} must be a plain file name")
            if fname not in files:
                files[fname] = SafetensorsFile.open(shard)
            if name not in files[fname].tensors:
                raise CheckpointError(f"{shard}: tensor {name} is listed in the index but missing from the shard")
            out[name] = files[fname]
        return out
    if single.is_file():
        f = SafetensorsFile.open(single)
        return {name: f for name in f.tensors}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _our_name(hf_name: str) -> str | None:
    """Map a transformers tensor name to dgemma's parameter name; None for names we do not use."""
    if hf_name.startswith(DECODER):
        return hf_name[len(DECODER):]
    if hf_name.startswith(ENCODER_TEXT):
        rest = hf_name[len(ENCODER_TEXT):]
        if rest.endswith(".layer_scalar"):
            return rest[: -len("layer_scalar")] + "encoder_layer_scalar"
        return "encoder:" + rest  # tied copy of a decoder weight; used only if the decoder copy is absent
    return None


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Every value finite, checked a slice at a time so the check's temporaries stay small beside the weights."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        if part.dtype == quant_fp8.FP8:  # no isfinite for float8 in torch
            part = part.float()
        if not bool(torch.isfinite(part).all()):
            return False
    return True


def _looks_like_integers(t: torch.Tensor, sample: int = 1 << 16) -> bool:
    """Most nonzero values below 1e-30: integer data (I16 read as BF16 is all subnormals), not trained weights,
    whose values are near 1e-2. A sample of the first values says it (no second pass over the weights)."""
    if t.ndim < 2 or t.dtype == quant_fp8.FP8:
        return False
    part = t.reshape(-1)[:sample].abs()
    nonzero = int((part != 0).sum())
    return nonzero > 0 and int(((part != 0) & (part < 1e-30)).sum()) > nonzero // 2


def _stored_dtype(files: dict[str, SafetensorsFile], name: str) -> torch.dtype | None:
    return DTYPES[files[name].tensors[name].dtype] if name in files else None


def _check_stored(f: SafetensorsFile, hf_name: str, want: torch.dtype) -> None:
    got = f.tensors[hf_name].dtype
    if DTYPES[got] != want:
        raise CheckpointError(f"{f.path}: tensor {hf_name} is {got}, but config.json's quantization_config says it "
                              f"is {DTYPE_NAMES[want]}")


def _fill_slot(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], slot: tuple[str, tuple],
               f: SafetensorsFile, hf_name: str, layout, device) -> None:
    """Copy one expert's tensor into its slice of the fused parameter, allocated on first use: the checkpoint streams
    in tensor by tensor and only the fused (packed) tensors are ever held."""
    param, index = slot
    if param not in tensors:
        tensors[param] = torch.empty(expected[param].shape, dtype=expected[param].dtype, device=device)
    target = tensors[param][index]
    ref = f.tensors[hf_name]
    if tuple(ref.shape) != tuple(target.shape) and not (target.dim() == 0 and ref.shape == [1]):
        raise CheckpointError(f"{f.path}: tensor {hf_name} has shape {tuple(ref.shape)}, expected "
                              f"{tuple(target.shape)}")
    _check_stored(f, hf_name, layout.exact[param])
    value = f.get(hf_name)
    if not _all_finite(value):
        raise CheckpointError(f"{f.path}: tensor {hf_name} holds NaN or Inf values; the checkpoint is corrupt")
    target.copy_(value.reshape(target.shape))
    drop_pages(f.map(), ref.begin, ref.end)


def default_dtype(device: torch.device | str) -> torch.dtype:
    # bf16 matmul is ~250x slower than fp32 on CPUs without AVX512-BF16, so the CPU computes in fp32.
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _load_vision(path: Path, config: ModelConfig, passthrough: dict[str, tuple[SafetensorsFile, str]],
                 device, dtype: torch.dtype) -> Vision:
    """The vision tower from its release-named tensors (which also stay in `passthrough`, so a save writes them back
    byte for byte)."""
    with torch.device("meta"):
        vision = Vision(config.vision, config.text.hidden_size)
    expected = vision.state_dict()
    tensors = {}
    for ours, want in expected.items():
        hf_name = VISION_ROOT + ours
        if hf_name not in passthrough:
            raise CheckpointError(f"{path}: missing tensor {hf_name} (config.json has a vision_config)")
        f, _ = passthrough[hf_name]
        ref = f.tensors[hf_name]
        if tuple(ref.shape) != tuple(want.shape):
            raise CheckpointError(f"{f.path}: tensor {hf_name} has shape {tuple(ref.shape)}, expected "
                                  f"{tuple(want.shape)}")
        if ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{f.path}: tensor {hf_name} is {ref.dtype}; weights must be floating point")
        tensors[ours] = f.get(hf_name, dtype).to(device)
        # the clipping bounds are +-inf by design; everything else must be finite
        if not ours.endswith(("_min", "_max")) and not _all_finite(tensors[ours]):
            raise CheckpointError(f"{f.path}: tensor {hf_name} holds NaN or Inf values; the checkpoint is corrupt")
    vision.load_state_dict(tensors, strict=True, assign=True)
    vision.vision_tower.reset_rope(device)
    return vision.eval()


def _load_tensor(f: SafetensorsFile, hf_name: str, ours: str, expected: torch.Tensor, layout, dtype, device):
    """One text tensor, checked against the model's (meta) tensor `expected`: shape, stored dtype (quantized
    tensors load as stored, FP8 scales in fp32, the rest in `dtype`) and finite, float-looking values."""
    ref = f.tensors[hf_name]
    want = tuple(expected.shape)
    if tuple(ref.shape) != want and not (want == () and ref.shape == [1]):  # a scalar may be stored as [1]
        raise CheckpointError(f"{f.path}: tensor {hf_name} has shape {tuple(ref.shape)}, expected {want}")
    want_dtype = dtype
    if layout is not None and ours in layout.exact:  # quantized tensors load exactly as stored
        _check_stored(f, hf_name, layout.exact[ours])
        want_dtype = None
    elif expected.dtype == quant_fp8.FP8:  # quantized weights load as stored; their scales in fp32
        if ref.dtype != "F8_E4M3":
            raise CheckpointError(f"{f.path}: tensor {hf_name} is {ref.dtype}, but config.json's "
                                  f"quantization_config says it is FP8 (F8_E4M3)")
        want_dtype = None
    elif expected.dtype == torch.uint8:  # int4 codes, two per byte: loaded as stored
        if ref.dtype != "U8":
            raise CheckpointError(f"{f.path}: tensor {hf_name} is {ref.dtype}, but config.json's "
                                  f"quantization_config says it holds int4 codes (U8)")
        want_dtype = None
    elif ref.dtype not in FLOAT_DTYPES:  # integer data would be converted to float silently, and garbage
        raise CheckpointError(f"{f.path}: tensor {hf_name} is {ref.dtype}; weights must be floating point "
                              f"({', '.join(FLOAT_DTYPES)})")
    elif ours.endswith("_scale_inv"):
        want_dtype = torch.float32
    tensor = f.get(hf_name, want_dtype).reshape(want).to(device)
    if not _all_finite(tensor):  # NaN weights give all-pad output with no hint why
        raise CheckpointError(f"{f.path}: tensor {hf_name} holds NaN or Inf values; the checkpoint is corrupt "
                              f"(or overflowed when it was converted)")
    if _looks_like_integers(tensor):  # would load as near-zero weights: all-pad output, no hint why
        raise CheckpointError(f"{f.path}: tensor {hf_name} looks like integer data declared as {ref.dtype} (most "
                              f"of its values are below 1e-30); the header does not match the data")
    return tensor


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         quiet: bool = False, vision: bool = True) -> Checkpoint:
    """Load a checkpoint directory. Raises CheckpointError / ConfigError with a one-line message.

    With `vision` (the default) a checkpoint's vision tower is loaded too; its tensors are kept for saving either
    way."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    dtype = dtype or default_dtype(device)
    raw_config = read_json(path / "config.json")
    config = ModelConfig.from_hf(raw_config, str(path / "config.json"), vision=vision)
    generation, eos_notice = GenerationConfig.load(path / "generation_config.json", config.text)

    files = _index_files(path)
    with torch.device("meta"):
        model = DiffusionGemma(config.text, config.canvas_length)
    layout = None  # a quantized checkpoint's layout: which format, and how its tensors load (dgemma/quant/formats.py)
    try:
        qc = quant_formats.quantization_config(raw_config, path)
        if qc is not None:
            layout = quant_formats.prepare(model, qc, str(path / "config.json"), lambda n: _stored_dtype(files, n))
    except quant_fp8.QuantError as e:
        raise CheckpointError(str(e)) from None
    expected = {k: v for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    passthrough: dict[str, tuple[SafetensorsFile, str]] = {}
    ignored: list[str] = []
    for hf_name, f in files.items():
        if hf_name.startswith(VISION_PREFIXES):
            passthrough[hf_name] = (f, hf_name)
            continue
        ours = _our_name(hf_name)
        if ours is None:
            if hf_name != "lm_head.weight":  # tied to the embeddings
                ignored.append(hf_name)
            continue
        if ours.startswith("encoder:"):
            tied[ours[len("encoder:"):]] = hf_name
            continue
        state[ours] = hf_name
    for ours, hf_name in tied.items():
        state.setdefault(ours, hf_name)
    slots = layout.slots if layout is not None else {}  # per-expert tensors -> slices of fused parameters
    fused = {param for param, _ in slots.values()}
    missing = [k for k in expected if k not in state and k not in fused] + [k for k in slots if k not in state]
    if missing:
        first = missing[0]
        hf = (ENCODER_TEXT + first.replace("encoder_layer_scalar", "layer_scalar")
              if first.endswith("encoder_layer_scalar") else DECODER + first)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {hf}{more}")
    tensors = {}
    for ours, hf_name in state.items():
        if ours in slots:
            _fill_slot(tensors, expected, slots[ours], files[hf_name], hf_name, layout, device)
            continue
        if ours not in expected:
            ignored.append(hf_name)
            continue
        tensors[ours] = _load_tensor(files[hf_name], hf_name, ours, expected[ours], layout, dtype, device)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rope(device)
    model.eval()
    tower, no_images = None, _no_images_reason(config, passthrough, vision)
    if no_images is None:
        tower = _load_vision(path, config, passthrough, device, dtype)
        # image token ids outside the vocabulary (transformers' defaults on a small one) refuse images, not text
        no_images = config.image_tokens_problem()
    notes = [eos_notice] if eos_notice else []
    if passthrough and tower is None:
        notes.append(f"not loading the vision tower ({len(passthrough)} tensors: {no_images}); text only (a save "
                     f"still writes its tensors)")
    if ignored:
        notes.append(f"ignoring {len(ignored)} unknown tensors, e.g. {ignored[0]}")
    for note in (notes + list(layout.notes if layout is not None else ())) if not quiet else ():
        print(f"dgemma: {note}", file=sys.stderr)
    return Checkpoint(model, config, generation, path, passthrough, raw_config.get("vision_config"), tower, no_images)


def _no_images_reason(config: ModelConfig, passthrough: dict, vision: bool) -> str | None:
    """Why a load has no vision tower, or None when it loads one."""
    if not passthrough:
        return "it has no vision tower"
    if not vision:
        return "its vision tower was not loaded (--no-vision)"
    if config.vision is None:
        return "no vision_config in config.json"
    return None


def hf_state_dict(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """dgemma parameter names -> the names transformers writes (tied encoder weights are stored once)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("encoder_layer_scalar"):
            out[ENCODER_TEXT + name[: -len("encoder_layer_scalar")] + "layer_scalar"] = t
        else:
            out[DECODER + name] = t
    return out


def _stays_as_is(name: str, t: torch.Tensor) -> bool:
    """Quantized weights and their scales keep their own dtypes whatever dtype the rest is saved in."""
    return (t.dtype == quant_fp8.FP8 or not t.is_floating_point() or name.endswith("_scale_inv")
            or quant_int4.stored_as_is(name))


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint stores its embeddings in (what `dgemma quantize` keeps the unquantized tensors in)."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a directory")
    files = _index_files(Path(path))
    for name in (DECODER + "embed_tokens.weight", ENCODER_TEXT + "embed_tokens.weight"):
        if name in files:
            return DTYPES[files[name].tensors[name].dtype]
    raise CheckpointError(f"{path}: no embed_tokens.weight tensor")


def save(out_dir: str | Path, model: DiffusionGemma, config: ModelConfig, generation: GenerationConfig,
         tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None,
         max_shard_bytes: int = 4 * 2**30, passthrough: dict | None = None, vision_config: dict | None = None) -> Path:
    """Write a checkpoint that transformers' DiffusionGemmaForBlockDiffusion.from_pretrained loads.

    Written into a temporary directory and moved into place, so a failure leaves nothing half-written. An existing
    `out_dir` must be empty or an earlier dgemma output, of which only the files dgemma wrote are replaced
    (output_dir.py)."""
    method = (getattr(model, "quantization_config", None) or {}).get("quant_method")
    if method in quant_formats.READ_ONLY:
        raise CheckpointError(f"dgemma reads {method} checkpoints but does not write them; save from the unquantized "
                              f"checkpoint (and `dgemma quantize` it) instead")

    out_dir = Path(out_dir)
    previous = previous_output(out_dir)
    tensors = {k: (v.to(dtype) if dtype and not _stays_as_is(k, v) else v).detach().contiguous().cpu()
               for k, v in hf_state_dict(model).items()}
    for name in [k for k in tensors if k.startswith(DECODER + "layers.") and k.endswith("_scale_inv")]:
        # transformers ties the encoder's weights to the decoder's, but not their scales: store the encoder's copy
        tensors[ENCODER_TEXT + name[len(DECODER):]] = tensors[name].clone()
    for name, (f, src) in (passthrough or {}).items():
        tensors[name] = f.raw(src)
    tmp = staging_dir(out_dir)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = config.to_hf()
        if dtype is not None:
            hf["dtype"] = str(dtype).replace("torch.", "")
        if quant_fp8.is_quantized(model):
            hf["quantization_config"] = model.quantization_config
        if vision_config is not None:
            hf["vision_config"] = vision_config
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation.to_hf(), indent=2))
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        commit(tmp, out_dir, previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
