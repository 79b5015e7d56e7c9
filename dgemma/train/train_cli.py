"""`dgemma train`: block-diffusion fine-tuning (full or LoRA) of a checkpoint, or training a preset from scratch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_common import PRESET_NAMES, CLIError, add_threads_arg, apply_threads, notice


FSDP_OR_DDP = {False: "DDP", True: "FSDP"}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune a model on JSONL data (full or LoRA)",
        description="Block-diffusion training on JSONL lines {\"prompt\", \"response\"} or {\"messages\": [...]}. "
                    "Writes <out>/checkpoint.safetensors (resumable), metrics.jsonl, loss.png (with matplotlib) and the exported model in "
                    "<out>/model (LoRA merged; the adapter alone in <out>/adapter).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory to fine-tune")
    src.add_argument("--preset", choices=PRESET_NAMES,
                     help="train a random-weight preset from scratch (needs --tokenizer; the vocabulary is sized to the tokenizer's)")
    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tokenizer", help="directory with tokenizer.json: required with --preset (default with --model: the --model directory)")
    p.add_argument("--template", choices=("auto", "raw", "chat"), default="auto",
                   help="how prompt/response pairs are formatted (auto: chat when the tokenizer has a template)")
    p.add_argument("--eval-data", help="held-out JSONL (default: up to 5%% of --data, at most 200 examples)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full training)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="linear warm-up of the learning rate (at most --steps)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--w-enc", type=float, default=1.0, help="weight of the encoder next-token loss")
    p.add_argument("--w-dec", type=float, default=1.0, help="weight of the decoder denoising loss")
    p.add_argument("--reweighted", action="store_true", help="weight the decoder loss by 1/(1-t), clipped at 10")
    p.add_argument("--enc-on-prompt", action="store_true", help="encoder loss on the prompt tokens too")
    add_refinement_args(p)
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and noise")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_distributed_args(p)
    add_threads_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, interrupt_hint="resume with --resume")
    return p


def add_refinement_args(p: argparse.ArgumentParser) -> None:
    """The self-conditioning options of the objective (TRAINING.md, step 6), for `train` and `sudoku train`."""
    p.add_argument("--self-cond-passes", type=int, default=1, metavar="N",
                   help="no-gradient self-conditioning passes before the gradient pass, 1 to N per step (training "
                        "then refines its own refined beliefs, as inference's steps do)")
    p.add_argument("--sampled-canvas", type=float, default=0.0, metavar="P",
                   help="probability that an example's later passes read a canvas holding the first pass's own "
                        "samples (wrong guesses included) among the noise, as inference's next step does "
                        "(TRAINING.md, Sudoku run 8: it did not raise the solve rate)")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2) "
                        "instead of replicating them (DDP): for a model that does not fit one device")


def start_distributed(args, device: str):
    """Join torchrun's process group (after the flag and path checks, so every rank has made them before any rank
    writes). -> (Distributed, this rank's device). --batch-size is the global batch."""
    import atexit

    from .distributed import init_from_env, launched_by_torchrun, shutdown

    d = init_from_env(device.split(":")[0], args.fsdp)
    if d.active:
        atexit.register(shutdown)
    if args.fsdp and not d.active:
        notice("train", "--fsdp has an effect only under torchrun with several processes; training on one")
    if d.active and args.batch_size % d.world_size:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                       f"{d.world_size} processes")
    if launched_by_torchrun() and device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
    return d, device


def record_run(run_dir, args, step: int, dist) -> None:
    """Append this invocation to <out>/runs.jsonl (rank 0; run_dir: the trainer's RunDirectory): the step it starts
    from, the command line, every option's value and the versions, so a run resumed across several invocations keeps
    its whole configuration beside its checkpoint. Appended, never rewritten: a line is the record of one
    invocation."""
    import torch

    import dgemma

    if not dist.is_main:
        return
    options = {k: v for k, v in vars(args).items()
               if isinstance(v, (str, int, float, bool, type(None))) and k != "interrupt_hint"}
    line = {"step": step, "argv": ["dgemma", *sys.argv[1:]], "options": options, "dgemma": dgemma.__version__,
            "torch": torch.__version__, "processes": dist.world_size if dist.active else 1}
    run_dir.append_line("runs.jsonl", line)


def _tokenizer(path: Path):
    from ..text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    if tok is None:
        raise CLIError(f"{path}: no tokenizer.json (pass --tokenizer DIR)")
    return tok


def _check_known_tokens(examples, tokenizer, data: str) -> None:
    """Refuse data that is mostly tokens the tokenizer does not know (its <unk>), such as text for the embedded
    Sudoku model, whose tokenizer knows digits only: training on it would teach nothing and write a model."""
    unk = tokenizer.token_id("<unk>")
    if unk is None:
        return
    ids = [t for ex in examples for t in ex.response_ids]
    unknown = sum(t == unk for t in ids)
    if ids and unknown * 2 > len(ids):
        raise CLIError(f"--data {data}: {unknown} of the responses' {len(ids)} tokens are unknown to this tokenizer "
                       f"(<unk>); it cannot read this data (is --model the right checkpoint?)")


def _configs(args, warmup_steps: int, LossConfig, TrainConfig):
    """The loss and training configs from the flags. Their own checks raise ValueError, naming the field
    (`lr must be ...`); here that becomes a user error."""
    try:
        loss_cfg = LossConfig(w_dec=args.w_dec, w_enc=args.w_enc, reweighted=args.reweighted,
                              self_cond_passes=args.self_cond_passes, sampled_canvas=args.sampled_canvas)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup_steps,
                          weight_decay=args.weight_decay, eval_every=args.eval_every, save_every=args.save_every,
                          seed=args.seed, enc_on_prompt=args.enc_on_prompt, loss=loss_cfg)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return loss_cfg, cfg


def _check_flags(args, out: Path) -> int:
    """The checks on --out, --resume and --lora-rank, before any loading; -> the warm-up steps to use."""
    from .run_dir import CHECKPOINT, RunDirectory

    if (out / CHECKPOINT).exists() and not args.resume:
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / CHECKPOINT).exists():
        raise CLIError(f"{out / CHECKPOINT} not found; nothing to resume")
    if args.lora_rank < 0:
        raise CLIError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    RunDirectory.open(out)  # refuses an --out holding files dgemma did not write
    if args.steps >= 1 and args.warmup_steps > args.steps:
        notice("train", f"--warmup-steps {args.warmup_steps} is longer than the run; warming up over all "
                        f"{args.steps} steps instead")
        return args.steps
    return args.warmup_steps


def _examples(args, tokenizer, config) -> tuple[list, list]:
    """The training and held-out examples: --eval-data, or up to 5% of --data (at most 200) held out."""
    from .data import read_jsonl

    limit = config.text.max_position_embeddings
    examples = read_jsonl(args.data, tokenizer, args.template, limit, config.canvas_length)
    _check_known_tokens(examples, tokenizer, args.data)
    if args.eval_data:
        return examples, read_jsonl(args.eval_data, tokenizer, args.template, limit, config.canvas_length)
    n_eval = min(200, len(examples) // 20)
    return (examples[:-n_eval], examples[-n_eval:]) if n_eval else (examples, [])


def held_out_loss(eval_examples: list, config, cfg):
    """The eval hook: mean loss on the held-out examples, with a fixed seed so steps compare."""
    import torch

    from .batch import collate
    from .objective import block_diffusion_loss

    def eval_fn(m) -> dict:
        g = torch.Generator().manual_seed(1234)
        totals, n = {"loss": 0.0, "dec_loss": 0.0, "enc_loss": 0.0}, 0
        with torch.no_grad():
            for i in range(0, len(eval_examples), cfg.batch_size):
                chunk = eval_examples[i:i + cfg.batch_size]
                batch = collate(chunk, config.canvas_length, config.text.eos_token_id[0], config.text.pad_token_id,
                                cfg.enc_on_prompt)
                o = block_diffusion_loss(m, batch, cfg.loss, g)
                for k, v in (("loss", float(o.loss)), ("dec_loss", o.dec_loss), ("enc_loss", o.enc_loss)):
                    totals[k] += v * len(chunk)
                n += len(chunk)
        return {k: round(v / n, 5) for k, v in totals.items()}

    return eval_fn


def cmd_train(args) -> int:
    import torch

    from ..cli_common import load_checkpoint
    from ..presets import default_generation, preset_config, random_model
    from .data import ShuffledExamples
    from ..quant import is_quantized
    from .lora import apply_lora
    from .objective import LossConfig
    from .trainer import TrainConfig, Trainer

    apply_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    warmup_steps = _check_flags(args, out)
    _, cfg = _configs(args, warmup_steps, LossConfig, TrainConfig)  # bad flags fail before any loading
    dist, device = start_distributed(args, device)

    # model, configs, tokenizer (training computes in fp32)
    if args.model:
        ckpt = load_checkpoint(args.model, device=device, dtype=torch.float32, quiet=True)
        model, config, generation = ckpt.model, ckpt.config, ckpt.generation
        if is_quantized(model):
            method = model.quantization_config.get("quant_method", "quantized")
            raise CLIError(f"{args.model} is quantized ({method}), and dgemma trains only unquantized weights: "
                           f"fine-tune the original checkpoint, then run `dgemma quantize` on the result")
        tok_dir = Path(args.tokenizer or args.model)
        tokenizer = _tokenizer(tok_dir)
        if tokenizer.vocab_size > config.text.vocab_size:
            raise CLIError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.text.vocab_size}")
    else:
        if not args.tokenizer:
            raise CLIError("--preset needs --tokenizer DIR (a directory with tokenizer.json): a preset has random "
                           "weights and no tokenizer of its own")
        tok_dir = Path(args.tokenizer)
        tokenizer = _tokenizer(tok_dir)
        # The embedding and head are sized to the tokenizer: rows it cannot decode would be sampled all the same.
        config = preset_config(args.preset, vocab_size=tokenizer.vocab_size)
        model = random_model(config, seed=args.seed, device=device)
    if args.preset:
        eos = tokenizer.eos_token_ids or config.text.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text.pad_token_id
        config.text.eos_token_id, config.text.pad_token_id = list(eos), pad
        generation = default_generation(config)
    examples, eval_examples = _examples(args, tokenizer, config)
    data = ShuffledExamples(examples, seed=args.seed)
    if args.lora_rank:
        apply_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    eval_fn = held_out_loss(eval_examples, config, cfg) if eval_examples else None
    trainer = Trainer(model, config, generation, cfg, data, out, eval_fn,
                      tokenizer_dir=tok_dir, base_model=args.model, quiet=args.quiet, dist=dist)
    if args.resume:
        try:
            trainer.load()
        except ValueError as e:  # Trainer.load reports a checkpoint it cannot use as a ValueError
            raise CLIError(str(e)) from None
        if dist.is_main:
            print(f"resumed {out} at step {trainer.step}", file=sys.stderr)
    record_run(trainer.run_dir, args, trainer.step, dist)
    if dist.is_main:
        where = f"{device} x {dist.world_size} processes ({FSDP_OR_DDP[dist.fsdp]})" if dist.active else device
        print(f"training on {len(examples)} examples ({len(eval_examples)} held out), "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, {where}",
              file=sys.stderr)
    trainer.train()
    path = trainer.export()
    if dist.is_main:
        print(f"model written to {path}")
    return 0
