"""What every `dgemma` subcommand shares: the user-error type, the model/device/dtype, sampling and thread flags,
and loading a checkpoint for a command.

The cli/ package and the *_cli modules import from here, never from each other. This module is light to import: torch and
the model code are imported inside the functions that use them, so building the parser (`dgemma --help`) costs
no torch import."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .errors import DgemmaError
from .package_data import SUDOKU_MODEL_DIR

__all__ = ["DgemmaError", "CLIError", "DEFAULT_MODEL", "DTYPES", "HelpFormatter", "Parser", "resolve_model_dir", "parse_ids",
           "pick_device", "load_checkpoint", "load_runtime", "add_model_args", "add_sampling_args",
           "add_threads_arg", "apply_threads", "available_cpus", "generation_config", "seed_everything",
           "SAMPLING_FLAGS", "PRESET_NAMES"]


class CLIError(DgemmaError):
    """A user error the CLI finds itself (a flag, a path): printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (argparse's formatter), except where there is nothing to show: a
    default of None or False, or a help text that already states it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in help_text:  # `is`: a default of 0 is shown
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """dgemma's argument parser: flag defaults in every help text, and a usage error is one line (exit status 2),
    like every other user error. Subcommand parsers inherit both (argparse builds them with the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# presets.PRESETS's names, without importing torch to build a parser (tests/test_cli.py checks they agree)
PRESET_NAMES = ("tiny", "small", "medium")

DEFAULT_MODEL = SUDOKU_MODEL_DIR
DEFAULT_MODEL_NOTE = ("the embedded default model is a Sudoku solver (its vocabulary is the digits 0-9, '.', '|', "
                      "'-', '+', space and newline), not a language model")


class _Dtypes(Mapping):
    """Flag name -> torch dtype, importing torch only when a dtype is looked up."""

    _names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
              "float16": "float16", "fp16": "float16"}

    def __getitem__(self, name: str):
        import torch

        return getattr(torch, self._names[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


DTYPES = _Dtypes()


def resolve_model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CLIError(f"no --model given and the embedded default model is missing at {DEFAULT_MODEL}")
    return DEFAULT_MODEL


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise CLIError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids is empty")
    return ids


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is available")
    return name


def load_checkpoint(path, **kwargs):
    """checkpoint.load for a command. The model is built on the meta device and then filled from the file, so
    nn.init's initialisers are skipped (runtime.skip_weight_init): on meta tensors they reach torch's Python
    reference ops, whose first call imports torch._dynamo (about 1.5 s of a 2 s `dgemma sudoku solve`)."""
    from .io import checkpoint
    from .runtime import skip_weight_init

    with skip_weight_init():
        return checkpoint.load(path, **kwargs)


def load_runtime(args):
    """Checkpoint (model, configs) and tokenizer (None when the checkpoint has none) for --model/--device/--dtype."""
    from .text.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    ckpt = load_checkpoint(model_dir, device=device, dtype=dtype, vision=not getattr(args, "no_vision", False))
    tokenizer = Tokenizer.from_dir(model_dir)
    return ckpt, tokenizer


# -- threads --------------------------------------------------------------------------------------------------------
def available_cpus() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets), further capped by a cgroup CPU quota
    (`docker --cpus`), which os.cpu_count() ignores both of."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads() -> int:
    """The cores this process may use less those other processes keep busy (the 1-minute load average), at least
    one. torch's threads wait for each other at every operation, so a thread that shares a busy core stalls the
    rest: on a 2-core machine under load, `sudoku solve` took 36-45 s with 2 threads and 18 s with 1."""
    n = available_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Unix
        return n
    return max(1, min(n, round(n - busy)))


def add_threads_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: the {available_cpus()} cores this process may use, less those "
                        f"other processes keep busy, at least 1){note}")


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: --threads if given, else default_threads() capped at torch's default (torch
    counts the machine's cores, not the ones this process is allowed, and oversubscribing a 2-core container
    costs a multiple of the time). Returns the number set."""
    import torch

    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    n = threads if threads is not None else min(torch.get_num_threads(), default_threads())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


# -- flags ----------------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, threads_note: str = "") -> None:
    p.add_argument("--model", help="checkpoint directory (default: the embedded Sudoku model, which is not a "
                                   "language model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-vision", action="store_true",
                   help="do not load the checkpoint's vision tower (text only; saves its memory)")
    add_threads_arg(p, threads_note)


# GenerationConfig field -> the flag that sets it, so that a bad value is reported under the name the user typed
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "max_denoising_steps": "--max-denoising-steps",
                  "entropy_bound": "--entropy-bound", "t_min": "--t-min", "t_max": "--t-max",
                  "stability_threshold": "--stability-threshold", "confidence_threshold": "--confidence-threshold"}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="stop after this many tokens (default: until EOS or the context limit)")
    p.add_argument("--max-denoising-steps", type=int, default=None,
                   help="cap on denoising steps per canvas (default: the checkpoint's generation_config.json)")
    p.add_argument("--entropy-bound", type=float, default=None,
                   help="entropy budget of the sampler per step (default: the checkpoint's)")
    p.add_argument("--t-min", type=float, default=None,
                   help="temperature at the last denoising step (default: the checkpoint's)")
    p.add_argument("--t-max", type=float, default=None,
                   help="temperature at the first denoising step (default: the checkpoint's)")
    p.add_argument("--stability-threshold", type=int, default=None,
                   help="early stop: steps the argmax canvas must stay unchanged (default: the checkpoint's)")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="early stop: mean entropy below which a stable canvas stops (default: the checkpoint's)")
    p.add_argument("--greedy", action="store_true",
                   help="sample the argmax at every step (the temperature schedule still drives acceptance and "
                        "self-conditioning), as a request's temperature 0 does")
    p.add_argument("--seed", type=int, default=None, help="seed for the canvas noise and sampling (default: random)")


def add_eos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-eos", action="store_true",
                   help="never stop at EOS: run to --max-new-tokens, as transformers does for a checkpoint whose "
                        "generation_config.json names no eos_token_id (its tokens, exactly)")


# Flags whose output must end in an EOS (a template's or a constraint's end, a fill-in-the-middle's join)
EOS_STEERING_FLAGS = ("suffix", "template", "json_schema", "json_object", "regex", "choice")


def flag_message(message: str, flags: Mapping[str, str]) -> str:
    """A config error's message with its field names replaced by the flags the user typed."""
    import re

    for field, flag in flags.items():
        message = re.sub(rf"(?<![\w-]){field}(?!\w)", flag, message)
    return message


def generation_config(args, base, flags: Mapping[str, str] = SAMPLING_FLAGS):
    """`base` with the sampling flags applied; a bad value is a CLIError that names the flag."""
    from .config import ConfigError

    values = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in flags.items()}
    if getattr(args, "no_eos", False):
        steered = [f"--{f.replace('_', '-')}" for f in EOS_STEERING_FLAGS if getattr(args, f, None)]
        if steered:
            raise CLIError(f"--no-eos cannot go with {steered[0]}, whose output ends in an EOS")
        values["eos_token_id"] = []
    try:
        return base.replace(**values)
    except ConfigError as e:
        raise CLIError(flag_message(str(e), flags)) from None


def seed_everything(seed: int | None) -> int:
    import torch

    # The global RNG, seeded like torch.manual_seed(S), is what reproduces the reference's tokens.
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    torch.manual_seed(seed)
    return seed


def notice(command: str, message: str) -> None:
    print(f"dgemma {command}: {message}", file=sys.stderr)
