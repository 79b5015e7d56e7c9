"""vLLM's structured-read fields, read as names for dgemma's own steering: a client written against vLLM's
DiffusionGemma structured reads sends them at the top level of the body or in `vllm_xargs` (vLLM's dict of extra
sampling arguments), and gets the same refusals for a seed of the wrong length and for pins without a seed.

  diffusion_seed_canvas  list of token ids, exactly one canvas: the first canvas starts as these tokens, none
                         renoised (seed_tokens with strength 0, unless the request sets strength)
  diffusion_pinned       canvas positions held at the seed's token on every step (pinned: position -> seed[position])
  diffusion_max_steps    denoising steps per canvas (max_denoising_steps)
  diffusion_read_only    true: read the first canvas and end there (after diffusion_max_steps steps, default 1):
                         the whole argmax canvas comes back with the log-probabilities at every position
                         (SamplingParams.read_only)
  diffusion_canvas_length  the request's canvas: only the served canvas length is accepted
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.checks import is_int
from .processor import InputError

FIELDS = ("diffusion_seed_canvas", "diffusion_pinned", "diffusion_max_steps", "diffusion_read_only",
          "diffusion_canvas_length")


@dataclass(frozen=True)
class StructuredRead:
    seed_tokens: tuple[int, ...] | None = None
    pinned: tuple[tuple[int, int], ...] | None = None
    max_steps: int | None = None
    read_only: bool = False


def given_fields(body) -> dict[str, object]:
    """The structured-read fields a body sets, at its top level or in vllm_xargs (a field in both is refused, as is
    a key of vllm_xargs this server does not read)."""
    given = {name: getattr(body, name) for name in FIELDS if getattr(body, name, None) is not None}
    for key, value in (getattr(body, "vllm_xargs", None) or {}).items():
        if key not in FIELDS:
            raise InputError(f"vllm_xargs: {key[:64]!r} is not an argument this server reads (it reads "
                             f"{', '.join(FIELDS)})", "vllm_xargs")
        if key in given:
            raise InputError(f"{key} is given both in the body and in vllm_xargs; give it once", key)
        if value is not None:
            given[key] = value
    return given


def structured_read(body, canvas_length: int | None, vocab_size: int) -> StructuredRead:
    """The seed, pins and step cap a body's structured-read fields ask for, checked as vLLM checks them (its
    messages for the seed's length and for pins without a seed); InputError naming the field."""
    given = given_fields(body)
    if not given:
        return StructuredRead()

    def check(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise InputError(message, param)

    width = given.get("diffusion_canvas_length")
    if width is not None:
        check(is_int(width) and width > 0 and (canvas_length is None or width == canvas_length),
              "diffusion_canvas_length", f"diffusion_canvas_length: this server denoises canvases of "
              f"{canvas_length} tokens only; give {canvas_length} or leave it out")
    seed = given.get("diffusion_seed_canvas")
    if seed is not None:
        check(isinstance(seed, list) and all(is_int(t) for t in seed), "diffusion_seed_canvas",
              "diffusion_seed_canvas must be a list of token ids.")
        check(all(0 <= t < vocab_size for t in seed), "diffusion_seed_canvas",
              f"diffusion_seed_canvas ids must be in [0, {vocab_size}).")
        check(canvas_length is None or len(seed) == canvas_length, "diffusion_seed_canvas",
              f"diffusion_seed_canvas must hold exactly {canvas_length} ids, got {len(seed)}.")
    pins = given.get("diffusion_pinned")
    if pins is not None:
        check(isinstance(pins, list) and all(is_int(p) for p in pins), "diffusion_pinned",
              "diffusion_pinned must be a list of canvas positions.")
        check(seed is not None, "diffusion_pinned", "diffusion_pinned needs a diffusion_seed_canvas to hold.")
        check(all(0 <= p < len(seed) for p in pins), "diffusion_pinned",
              "diffusion_pinned positions must lie inside the canvas.")
    steps = given.get("diffusion_max_steps")
    if steps is not None:
        check(is_int(steps) and steps > 0, "diffusion_max_steps", "diffusion_max_steps must be a positive integer.")
        check(steps <= 1024, "diffusion_max_steps", f"diffusion_max_steps must be at most 1024, got {steps}")
    read_only = given.get("diffusion_read_only")
    if read_only is not None:
        check(isinstance(read_only, (bool, int)) and read_only in (0, 1), "diffusion_read_only",
              "diffusion_read_only must be a boolean (or 0/1).")
        if read_only and steps is None and body.max_denoising_steps is None:
            steps = 1  # a read is one step unless the request says otherwise
    _check_no_clash(body, seed is not None, pins is not None, steps)
    return StructuredRead(
        seed_tokens=tuple(seed) if seed is not None else None,
        pinned=tuple(sorted({p: seed[p] for p in pins}.items())) if pins is not None else None,
        max_steps=steps, read_only=bool(read_only))


def _check_no_clash(body, seeded: bool, pinned: bool, steps: int | None) -> None:
    """A vLLM name and dgemma's own name for the same thing are not both taken."""
    if seeded and (body.seed_tokens is not None or body.prediction is not None):
        raise InputError("give diffusion_seed_canvas or seed_tokens/prediction, not both", "diffusion_seed_canvas")
    if pinned and (body.pinned is not None or getattr(body, "template", None) is not None):
        raise InputError("give diffusion_pinned or pinned/template, not both", "diffusion_pinned")
    if steps is not None and body.max_denoising_steps is not None and steps != body.max_denoising_steps:
        raise InputError(f"diffusion_max_steps ({steps}) and max_denoising_steps ({body.max_denoising_steps}) "
                         f"disagree; give one", "diffusion_max_steps")
