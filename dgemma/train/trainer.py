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
import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..config import ConfigError, GenerationConfig, ModelConfig
from ..io.checkpoint import CheckpointError
from ..io.checkpoint import save as save_checkpoint_dir
from ..io.output_dir import previous_output
from . import distributed as D
from .batch import Example, collate
from .lora import has_lora, merge_lora, save_adapter
from .plot import plot_losses
from .run_dir import CHECKPOINT, LEGACY_CHECKPOINT, RunDirectory
from .state_file import TrainingError, load_state, save_state, state_checksum, trainable_state  # noqa: F401
from .train_config import TrainConfig, lr_factor

__all__ = ["CHECKPOINT", "LEGACY_CHECKPOINT", "Trainer", "TrainConfig", "TrainingError", "TrainingStopped",
           "load_state", "lr_factor", "save_state", "state_checksum", "trainable_state"]


class TrainingStopped(KeyboardInterrupt):
    """A signal stopped the run after a whole step, whose checkpoint was saved; the message says which step."""


class DataSource(Protocol):
    def next_batch(self, batch_size: int) -> list[Example]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


EvalFn = Callable[[torch.nn.Module], dict]


class Trainer:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, generation: GenerationConfig,
                 cfg: TrainConfig, data: DataSource, out_dir: str | Path, eval_fn: EvalFn | None = None,
                 tokenizer_dir: str | Path | None = None, base_model: str | None = None, quiet: bool = False,
                 export_on_eval: bool = False, dist: D.Distributed = D.SINGLE):
        if dist.active and cfg.batch_size % dist.world_size:
            raise ConfigError(f"batch-size {cfg.batch_size} must be a multiple of the {dist.world_size} processes")
        self.model, self.model_config, self.generation = model, model_config, generation
        self.cfg, self.data, self.eval_fn = cfg, data, eval_fn
        self.out_dir = Path(out_dir)
        self.tokenizer_dir, self.base_model, self.quiet = tokenizer_dir, base_model, quiet or not dist.is_main
        self.stop_asked = False  # set by SIGINT/SIGTERM while training (_stop_on_signals)
        self.export_on_eval = export_on_eval  # keep <out>/model current, so a long run can be used at any time
        # refuse, before hours of training, a <out>/model or any other file there that dgemma did not write
        previous_output(self.out_dir / "model")
        self.run_dir = RunDirectory.open(self.out_dir)
        self._metrics_written = False  # metrics.jsonl is rewritten from the history once, then appended to
        self.dist = dist
        # Under FSDP rank 0 keeps a whole copy on the CPU for eval and export (filled from the shards when needed).
        self._replica = copy.deepcopy(model).cpu() if dist.active and dist.fsdp and dist.is_main else None
        self.step_module = D.wrap(model, dist)  # FSDP swaps the parameters for shards: the optimizer comes after
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters")
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
            save_state(state, self.run_dir.claim(CHECKPOINT))
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
        if self.dist.is_main:  # drop the metric lines a killed run logged past this checkpoint
            self._write_metrics()

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
        if not self.dist.is_main:
            return None
        out_dir = Path(out_dir) if out_dir is not None else self.run_dir.claim("model")
        if has_lora(model):
            save_adapter(model, self.run_dir.claim("adapter"), self.base_model)
            model = merge_lora(copy.deepcopy(model))
        return save_checkpoint_dir(out_dir, model, self.model_config, self.generation, self.tokenizer_dir)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _log(self, line: dict) -> None:
        self.history.append(line)
        if not self.dist.is_main:
            return
        if self._metrics_written:
            self.run_dir.append_line("metrics.jsonl", line)
        else:  # a run that starts afresh where a run killed before its first checkpoint logged
            self._write_metrics()

    def _write_metrics(self) -> None:
        """metrics.jsonl := the history, one line per entry (only ever a file dgemma wrote: run_dir.py)."""
        self.run_dir.write_lines("metrics.jsonl", self.history)
        self._metrics_written = True

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
                    plot_losses(self.history, self.run_dir.claim("loss.png"), quiet=self.step != end)  # ~1 s
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
