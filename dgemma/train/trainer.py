"""The training loop: AdamW, warmup + cosine, gradient clipping, periodic eval, resumable checkpoints, export.

One step (numbers reused in the code):
  1. Draw the next batch from the data source and collate it into canvases.
  2. Compute the block-diffusion loss (objective.py), backpropagate, clip the gradient norm, step AdamW and the
     learning-rate schedule.
  3. Every `log_every` steps append a metrics line; every `eval_every` steps run the eval hook; every
     `save_every` steps write the checkpoint.

Checkpoint: <out>/checkpoint.safetensors holds the trainable parameters, the optimizer, the schedule, every random
state (the objective's generator, torch's, Python's, the data source's) and the metric history: the tensors as
safetensors, everything else as JSON in the file's metadata, so resuming unpickles nothing. The metadata also holds
a sha256 of the whole state, checked on resume. A checkpoint is written to a temporary file, read back and verified,
and only then renamed over the previous one, so a run killed at any moment (SIGKILL included) resumes from its last
checkpoint with exactly the state it had then, and a bad write never replaces a good checkpoint.

Several processes (torchrun; see distributed.py): every rank draws the global batch and computes its share of
the rows; DDP or FSDP average the gradients, so the run takes the one-process steps. Rank 0 alone writes metrics,
checkpoints and exports, in the one-process layout, so a checkpoint resumes on any number of processes.

A non-finite loss or gradient stops the run (TrainingError, naming the step) before the update, so the last
checkpoint stays the last good state; a state holding NaN or Inf is never saved.

SIGINT (Ctrl-C) or SIGTERM (a scheduler taking the machine back) asks the run to stop: it finishes the step it is
in, saves a checkpoint of that step and raises TrainingStopped, so nothing since the last periodic save is lost. The
request rides on the step's metrics all-reduce, so every rank stops after the same step. A second signal stops at
once (KeyboardInterrupt), losing what the first would have saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..checkpoint import CheckpointError
from ..checkpoint import save as save_checkpoint_dir
from ..config import GenerationConfig, ModelConfig
from ..errors import DgemmaError
from ..output_dir import previous_output
from . import distributed as D
from .batch import Example, collate
from .lora import has_lora, merge_lora, save_adapter
from .objective import LossConfig
from .plot import plot_losses

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # older dgemma pickled its state; that file is refused, never loaded
STATE_KEY, CHECKSUM_KEY = "dgemma_train_state", "dgemma_train_sha256"


class TrainingError(DgemmaError, ValueError):
    """Training cannot go on (a non-finite loss, gradient or state); the message names the step or the tensor."""


class TrainingStopped(KeyboardInterrupt):
    """A signal stopped the run after a whole step, whose checkpoint was saved; the message says which step."""


class DataSource(Protocol):
    def next_batch(self, batch_size: int) -> list[Example]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1.5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.99)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 100
    seed: int = 0
    enc_on_prompt: bool = False  # encoder loss on the prompt too (NeMo) or the response only (Megatron)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every", "eval_every", "save_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("weight_decay must be >= 0 and grad_clip > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine from 1 down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def state_checksum(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a saved state: its JSON structure, then each tensor's name, dtype, shape and bytes in name order."""
    h = hashlib.sha256(structure.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(state: dict, path: Path) -> None:
    """Write a state dict of tensors, numbers, strings, lists, tuples and dicts (any hashable JSON-able keys) as
    one safetensors file: tensors as tensors, the structure and its checksum as JSON metadata. Refuses NaN or Inf in
    a floating-point tensor. Writes a temporary file, reads it back and verifies it, then renames it over `path`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def pack(obj, where: str):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().clone().contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingError(f"not saving {path}: {where} holds NaN or Inf (the last good checkpoint is kept)")
            key = str(len(tensors))
            tensors[key] = t
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[pack(k, where), pack(v, f"{where}.{k}" if where else str(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot save a {type(obj).__name__} in a training checkpoint")

    structure = json.dumps(pack(state, ""))
    checksum = state_checksum(structure, tensors)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={STATE_KEY: structure, CHECKSUM_KEY: checksum})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:  # read back: a write that does not verify must not replace the last good checkpoint
            load_state(tmp)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: the checkpoint just written does not read back intact, so the previous one "
                                  f"is kept (a disk or file system fault?): {e}") from None
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_state(path: Path) -> dict:
    """Read what save_state wrote, verifying its checksum."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if STATE_KEY not in metadata:
                raise CheckpointError(f"{path}: not a dgemma training checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({e})") from None
    structure = metadata[STATE_KEY]
    if CHECKSUM_KEY not in metadata:
        print(f"dgemma: {path} has no checksum (written by an older dgemma); resuming without verifying it",
              file=sys.stderr)
    elif state_checksum(structure, tensors) != metadata[CHECKSUM_KEY]:
        raise CheckpointError(f"{path}: checksum mismatch, the training checkpoint is corrupt")

    def unpack(obj):
        if isinstance(obj, list):
            return [unpack(v) for v in obj]
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__tuple__" in obj:
                return tuple(unpack(v) for v in obj["__tuple__"])
            return {unpack(k): unpack(v) for k, v in obj["__dict__"]}
        return obj

    try:
        return unpack(json.loads(structure))
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{path}: malformed training checkpoint state") from None


EvalFn = Callable[[torch.nn.Module], dict]


class Trainer:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, generation: GenerationConfig,
                 cfg: TrainConfig, data: DataSource, out_dir: str | Path, eval_fn: EvalFn | None = None,
                 tokenizer_dir: str | Path | None = None, base_model: str | None = None, quiet: bool = False,
                 export_on_eval: bool = False, dist: D.Distributed = D.SINGLE):
        if dist.active and cfg.batch_size % dist.world_size:
            raise ValueError(f"batch-size {cfg.batch_size} must be a multiple of the {dist.world_size} processes")
        self.model, self.model_config, self.generation = model, model_config, generation
        self.cfg, self.data, self.eval_fn = cfg, data, eval_fn
        self.out_dir = Path(out_dir)
        self.tokenizer_dir, self.base_model, self.quiet = tokenizer_dir, base_model, quiet or not dist.is_main
        self.stop_asked = False  # set by SIGINT/SIGTERM while training (_stop_on_signals)
        self.export_on_eval = export_on_eval  # keep <out>/model current, so a long run can be used at any time
        previous_output(self.out_dir / "model")  # refuse, before hours of training, a <out>/model dgemma did not write
        self.dist = dist
        # Under FSDP rank 0 keeps a whole copy on the CPU for eval and export (filled from the shards when needed).
        self._replica = copy.deepcopy(model).cpu() if dist.active and dist.fsdp and dist.is_main else None
        self.step_module = D.wrap(model, dist)  # FSDP swaps the parameters for shards: the optimizer comes after
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        # no weight decay on norms, scalars and other vectors
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []  # metric lines, also written to metrics.jsonl

    # ---- checkpoints ------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def _optimizer_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]  # the order of the saved state's ids

    def state_dict(self) -> dict:
        """The whole state in the one-process layout (under FSDP every rank must call this: it gathers shards)."""
        model = {n: D.full_tensor(p.detach()).clone() for n, p in self.model.named_parameters() if p.requires_grad}
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: D.full_tensor(v) for k, v in st.items()} for i, st in optimizer["state"].items()}
        return {
            "step": self.step,
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "data": self.data.state_dict(),
            "history": self.history,
            "train_config": asdict(self.cfg),
            "model_config": self.model_config.to_hf(),
        }

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (all ranks call this: FSDP gathers the shards first)."""
        state = self.state_dict() if self.dist.is_main or self.dist.fsdp else None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_state(state, self.checkpoint_path)
        return self.checkpoint_path

    def load(self, path: Path | None = None) -> None:
        """Resume from a checkpoint. With several processes rank 0 reads and verifies it, then sends it to the
        others (so only rank 0's disk needs it); every rank must call this."""
        path = path or self.checkpoint_path
        state: dict | CheckpointError | None = None
        if self.dist.is_main:
            try:
                legacy = path.with_name(LEGACY_CHECKPOINT)
                if not path.exists() and legacy.exists():
                    raise CheckpointError(f"{legacy} is a pickled checkpoint from an older dgemma; dgemma does not "
                                          f"unpickle files, so it cannot resume it. Start the run again in a new --out")
                state = load_state(path)
            except CheckpointError as e:
                if not self.dist.active:
                    raise
                state = e
        state = D.broadcast_object(state, self.dist)  # between this run's own processes, not from the file
        if isinstance(state, CheckpointError):
            raise state
        if state["model_config"] != self.model_config.to_hf():
            raise CheckpointError(f"{path}: the checkpoint was written for a different model")
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state["model"]]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks trainable tensor {missing[0]} (LoRA settings differ?)")
        bad = [n for n, t in state["model"].items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # an older dgemma could save one
            raise CheckpointError(f"{path}: tensor {bad[0]} holds NaN or Inf; the checkpoint cannot be resumed")
        with torch.no_grad():
            for name, t in state["model"].items():
                params[name].copy_(D.shard_like(t, params[name]))  # FSDP: this rank's shard of it
        optimizer = state["optimizer"]
        by_id = self._optimizer_params()
        optimizer["state"] = {i: {k: D.shard_like(v, by_id[int(i)]) if v.shape == by_id[int(i)].shape else v
                                  for k, v in st.items()} for i, st in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.data.load_state_dict(state["data"])
        self.history = state["history"]
        self.step = state["step"]
        if not self.dist.is_main:
            return
        # drop metric lines logged after this checkpoint (a killed run logs past its last save)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(line) + "\n" for line in self.history))
        os.replace(tmp, self.out_dir / "metrics.jsonl")

    def _whole_model(self) -> torch.nn.Module | None:
        """The model with whole tensors on rank 0 (None elsewhere). Under FSDP: rank 0's CPU copy, filled from
        the shards (a collective: every rank calls this)."""
        if not (self.dist.active and self.dist.fsdp):
            return self.model if self.dist.is_main else None
        replica = dict(self._replica.named_parameters()) if self._replica is not None else {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                whole = D.full_tensor(p.detach())
                if name in replica:
                    replica[name].copy_(whole)
        return self._replica

    def export(self, out_dir: str | Path | None = None) -> Path | None:
        """Write the model in the released HF format (LoRA merged into a copy; training goes on unmerged). Rank 0
        writes and returns the path; every rank must call this (FSDP gathers the shards)."""
        path = self._write_export(self._whole_model(), out_dir)
        self.dist.wait()
        return path

    def _write_export(self, model: torch.nn.Module | None, out_dir: str | Path | None = None) -> Path | None:
        out_dir = Path(out_dir) if out_dir is not None else self.out_dir / "model"
        if not self.dist.is_main:
            return None
        if has_lora(model):
            save_adapter(model, self.out_dir / "adapter", self.base_model)
            model = merge_lora(copy.deepcopy(model))
        return save_checkpoint_dir(out_dir, model, self.model_config, self.generation, self.tokenizer_dir)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _log(self, line: dict) -> None:
        self.history.append(line)
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def run_eval(self) -> dict:
        """Rank 0 runs the eval hook (give every rank the same hook, or none: FSDP gathers the model first)."""
        if self.eval_fn is None:
            return {}
        model = self._whole_model()
        metrics: dict = {}
        if self.dist.is_main:
            model.eval()
            try:
                metrics = self.eval_fn(model)
            finally:
                model.train()
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if self.export_on_eval:
            self._write_export(model)  # the model just gathered
        return metrics

    def train_step(self, examples: list[Example]) -> tuple[dict, float]:
        """One optimizer step on the global batch `examples`. -> (metrics as one process computes them, the
        gradient norm before clipping)."""
        cfg, text, d = self.cfg, self.model_config.text, self.dist
        # 1. batch (the whole global batch on every rank; the objective takes this rank's rows)
        batch = collate(examples, self.model_config.canvas_length, text.eos_token_id[0], text.pad_token_id,
                        cfg.enc_on_prompt)
        # 2. loss, backward, clip, step; a non-finite loss or gradient stops here, before the update (one sync each:
        #    the loop reads the loss anyway, and an update with NaN would poison every weight and the next checkpoint).
        #    With several ranks the metrics are averaged first (one all-reduce), so every rank stops together.
        out = self.step_module(batch, cfg.loss, self.generator, (d.rank, d.world_size))
        loss, dec_loss, enc_loss, dec_acc, tokens, stop = D.mean_over_ranks(
            [float(out.loss.detach()), out.dec_loss, out.enc_loss, out.dec_accuracy, out.tokens,
             float(self.stop_asked)], d, out.loss.device)
        if not math.isfinite(loss):
            raise self._diverged(f"the loss is {loss}")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = float(D.full_tensor(torch.nn.utils.clip_grad_norm_(self._optimizer_params(), cfg.grad_clip)))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"the gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = {"loss": loss, "dec_loss": dec_loss, "enc_loss": enc_loss, "dec_acc": dec_acc,
                   "tokens": round(tokens * d.world_size), "stop": stop > 0}  # stop: some rank was asked to
        return metrics, grad_norm

    def _diverged(self, what: str) -> TrainingError:
        kept = (f"the last good checkpoint, {self.checkpoint_path}, is kept" if self.checkpoint_path.exists()
                else "no checkpoint was written")
        return TrainingError(f"step {self.step + 1}: {what}; stopped before the update ({kept}). Lower --lr or check "
                             f"the data, then resume")

    def train(self, stop_after: int | None = None) -> None:
        """Train to `cfg.steps` (or `stop_after` more steps, for tests that interrupt a run)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.model.train()
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.quiet, dynamic_ncols=True, mininterval=2.0,
                   file=sys.stderr)
        try:
            with self._stop_on_signals():
                self._train_loop(end, bar)
        finally:
            bar.close()
        self.dist.wait()

    def _train_loop(self, end: int, bar) -> None:
        cfg = self.cfg
        window_tokens, window_start = 0, time.perf_counter()
        last_plot = window_start
        acc = {"loss": 0.0, "dec_loss": 0.0, "enc_loss": 0.0, "dec_acc": 0.0, "n": 0}
        while self.step < end:
            metrics, grad_norm = self.train_step(self.data.next_batch(cfg.batch_size))
            stop = metrics.pop("stop")
            window_tokens += metrics.pop("tokens")
            for k, v in metrics.items():
                acc[k] += v
            acc["n"] += 1
            bar.update(1)
            # 3. log, eval, save
            if self.step % cfg.log_every == 0 or self.step == end or stop:
                elapsed = time.perf_counter() - window_start
                n = acc.pop("n")
                line = {"step": self.step, **{k: round(v / n, 5) for k, v in acc.items()},
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4),
                        "tokens_per_s": round(window_tokens / elapsed, 1)}
                self._log(line)
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                window_tokens, window_start = 0, time.perf_counter()
                acc = {k: 0.0 for k in acc} | {"n": 0}
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                metrics = self.run_eval()
                if metrics:
                    bar.write(f"step {self.step}: " + " ".join(f"{k}={v}" for k, v in metrics.items()))
            if self.step % cfg.save_every == 0 or self.step == end or stop:
                self.save()
                if self.dist.is_main and (self.step == end or stop or time.perf_counter() - last_plot > 60):
                    plot_losses(self.history, self.out_dir / "loss.png", quiet=self.step != end)  # ~1 s each
                    last_plot = time.perf_counter()
            if stop and self.step < end:
                self.dist.wait()
                raise TrainingStopped(f"stopped after step {self.step} of {cfg.steps}, its checkpoint saved in "
                                      f"{self.out_dir}")

    @contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT and SIGTERM set `stop_asked` (the loop stops after the step); a second signal
        raises KeyboardInterrupt at once. A signal the process ignores (SIGINT under nohup) stays ignored, and
        outside the main thread, where Python cannot catch signals, nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum, frame):
            if self.stop_asked:
                raise KeyboardInterrupt
            self.stop_asked = True
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (send it again to "
                  f"stop at once)", file=sys.stderr, flush=True)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, ask)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop_asked = False
