"""Sudoku as a block-diffusion task: the vocabulary, the model config, prompt formatting, training data, eval.

The model reads `<bos>` and the 81 cells of the puzzle (digit tokens, "0" for an empty cell) and writes the 81
digits of the solution and `<eos>`: exactly one canvas of 82 tokens, denoised in parallel.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import FULL, SLIDING, GenerationConfig, ModelConfig, TextConfig
from ..control.pins import Steering
from ..generate import generate  # imported up front: a long training run must not pick up later edits at eval
from ..package_data import SUDOKU_MODEL_DIR as ASSET_DIR
from ..train.batch import Example
from .sudoku_puzzles import CELLS, generate_puzzles, is_solution, make_puzzle, minimal_puzzle, shuffle_symmetry

PAD, EOS, BOS = 0, 1, 2
DIGIT0 = 3  # token id of "0"; digit d is DIGIT0 + d
# The same ids as dgemma.testing.write_sudoku_tokenizer: separators for pretty-printed grids, and <unk> last.
WORDS = ["<pad>", "<eos>", "<bos>"] + [str(d) for d in range(10)] + ["\n", " ", "|", "-", "+", ".", "<unk>"]
# The model's vocabulary is padded with unused tokens. Noise is uniform over the whole vocabulary (training's
# corruption and the sampler's renoising alike): over the 20 words, 9 draws in 20 are digits 1-9 that a model cannot
# tell from a kept cell; over 256 tokens 9 in 256 are, so a renoised cell reads as "not known yet", as it does for
# DiffusionGemma's 262k-token vocabulary. A model with the 20 words alone (the first shipped ones) still loads.
VOCAB_SIZE = 256
VOCAB = WORDS + [f"<unused{i}>" for i in range(VOCAB_SIZE - len(WORDS))]
CANVAS_LENGTH = CELLS + 1  # the solution and its EOS

# The shipped difficulty: 44 givens (37 empty cells), unique solution: an "easy" newspaper Sudoku, where most
# empty cells follow from their row, column and box alone. Training draws 30-50 givens.
GIVENS = 44
TRAIN_GIVENS = (30, 50)
HELDOUT_SEED = 20_240_601
HELDOUT_SIZE = 1000
VALIDATION_OFFSET = 7_000_000  # training's periodic evals use a validation set, so choosing a run never sees the test set


def sudoku_config(hidden_size: int = 192, num_layers: int = 6, vocab_size: int = VOCAB_SIZE) -> ModelConfig:
    """A small DiffusionGemma for Sudoku. The sliding window covers the whole 164-token sequence, so the sliding
    layers are full attention with full-width RoPE; the last layer is the required full-attention layer."""
    heads = 6 if hidden_size % 6 == 0 else 4
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        head_dim=hidden_size // heads, global_head_dim=2 * (hidden_size // heads), num_global_key_value_heads=1,
        sliding_window=256, layer_types=[SLIDING] * (num_layers - 1) + [FULL],
        num_experts=2, top_k_experts=1, moe_intermediate_size=hidden_size // 2,
        max_position_embeddings=256, final_logit_softcapping=30.0,
        pad_token_id=PAD, eos_token_id=[EOS], bos_token_id=BOS,
    )
    return ModelConfig(text=text, canvas_length=CANVAS_LENGTH)


def grow_vocabulary(model, config: ModelConfig, seed: int = 0):
    """`model` (a Sudoku model with fewer tokens, the 20 words say) as a model of `config`'s vocabulary: every
    weight kept, the new embedding rows drawn with init_weights' std (presets.INIT_STD)."""
    from ..model import DiffusionGemma
    from ..presets import INIT_STD

    old = model.embed_tokens.weight.detach().float().cpu()
    V, H = config.text.vocab_size, config.text.hidden_size
    if old.shape[0] > V or old.shape[1] != H:
        raise ValueError(f"cannot grow an embedding of {tuple(old.shape)} to ({V}, {H})")
    extra = torch.randn(V - old.shape[0], H, generator=torch.Generator().manual_seed(seed)) * INIT_STD
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    state["embed_tokens.weight"] = torch.cat([old, extra])
    grown = DiffusionGemma(config.text, config.canvas_length)
    grown.load_state_dict(state)
    return grown


def grow_depth(model, config: ModelConfig):
    """`model` with more sliding layers, as `config` asks, computing exactly what it computed: each new layer is a
    copy of the sliding layer before it whose two output norms (after attention, after the feed-forward) are zero,
    so it adds nothing to the residual stream until training opens it (slowly: AdamW moves a norm weight by about
    one learning rate a step at most; TRAINING.md, run 9). The extra layers are spread evenly after the sliding
    layers; the full-attention layer stays last."""
    from ..model import DiffusionGemma

    old_n, new_n = len(model.layers), config.text.num_hidden_layers
    if new_n < old_n or model.config.hidden_size != config.text.hidden_size \
            or model.config.vocab_size != config.text.vocab_size:
        raise ValueError(f"cannot grow a model of {old_n} layers (hidden size {model.config.hidden_size}) to "
                         f"{new_n} layers (hidden size {config.text.hidden_size})")
    sliding, extra = old_n - 1, new_n - old_n
    if extra and sliding < 1:
        raise ValueError("cannot grow a model with no sliding layer to copy")
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    grown, source = {}, []  # source[j]: (old layer index, whether layer j is a silent copy)
    for i in range(sliding):
        source.append((i, False))
        source += [(i, True)] * (extra // sliding + (i < extra % sliding))
    source.append((old_n - 1, False))
    for key, value in state.items():
        if not key.startswith("layers."):
            grown[key] = value
    for j, (i, silent) in enumerate(source):
        prefix = f"layers.{i}."
        for key, value in state.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                silenced = silent and name in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
                grown[f"layers.{j}.{name}"] = torch.zeros_like(value) if silenced else value.clone()
    deeper = DiffusionGemma(config.text, config.canvas_length)
    deeper.load_state_dict(grown)
    return deeper


def sudoku_generation() -> GenerationConfig:
    """Default sampler for Sudoku: one canvas, low temperature (a puzzle has one answer)."""
    return GenerationConfig(max_new_tokens=CANVAS_LENGTH, max_denoising_steps=48, entropy_bound=0.1,
                            t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
                            eos_token_id=[EOS], pad_token_id=PAD)


# ---- formatting -------------------------------------------------------------------------------------------------

def prompt_ids(puzzle: list[int]) -> list[int]:
    return [BOS] + [DIGIT0 + d for d in puzzle]


def response_ids(solution: list[int]) -> list[int]:
    """Without the EOS (collation and the tokenizer's user add it)."""
    return [DIGIT0 + d for d in solution]


def decode_grid(ids: list[int]) -> list[int] | None:
    """The first 81 generated ids as digits; None if any is not a digit 1-9."""
    if len(ids) < CELLS:
        return None
    grid = [i - DIGIT0 for i in ids[:CELLS]]
    return grid if all(1 <= d <= 9 for d in grid) else None


def write_tokenizer(out_dir: str | Path) -> Path:
    """tokenizer.json (+ tokenizer_config.json): one token per character; encoding with special tokens prepends
    <bos>, so encode("5300700...") gives the model's prompt."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel would otherwise join tokens with spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>", "<unk>")
                            + tuple(VOCAB[len(WORDS):])])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return out_dir / "tokenizer.json"


# ---- data -------------------------------------------------------------------------------------------------------

def heldout_set(n: int = HELDOUT_SIZE, givens: int | tuple[int, int] = GIVENS,
                validation: bool = False) -> list[tuple[list[int], list[int]]]:
    """The fixed held-out puzzles (seeded; the training stream uses other seeds). `givens` is a count, or an
    inclusive range (lo, hi) from which each puzzle's count is drawn (a newspaper's 23-36, say). Either way the
    first n puzzles of a larger set are the same puzzles. `validation` gives another fixed set of the same
    difficulty, for choosing among runs and checkpoints; the held-out set is only for reporting."""
    seed = heldout_seed(givens) + (VALIDATION_OFFSET if validation else 0)
    if isinstance(givens, int):
        return generate_puzzles(n, givens, seed)
    lo, hi = givens
    rng = random.Random(seed)
    return [make_puzzle(rng, rng.randint(lo, hi)) for _ in range(n)]


def heldout_seed(givens: int | tuple[int, int]) -> int:
    return HELDOUT_SEED + givens if isinstance(givens, int) else HELDOUT_SEED + 100 * givens[0] + givens[1] + 10_000


HARD_MAX_GIVENS = 25
HARD_SEED = HELDOUT_SEED + 25_000


def hard_set(n: int = HELDOUT_SIZE, max_givens: int = HARD_MAX_GIVENS) -> list[tuple[list[int], list[int]]]:
    """A fixed held-out set of hard puzzles: minimal puzzles (no given can be removed) with at most `max_givens`
    givens, seeded and prefix-stable. The generator's minimal puzzles have about 21-27 givens, so with 25 this is
    the 17-25-given hard set as far as the generator reaches: of the 1,000, one has 21 givens, 45 have 22 and the
    rest 23-25."""
    rng = random.Random(hard_seed(max_givens))
    out = []
    while len(out) < n:
        puzzle, solution = minimal_puzzle(rng)
        if CELLS - puzzle.count(0) <= max_givens:
            out.append((puzzle, solution))
    return out


def hard_seed(max_givens: int = HARD_MAX_GIVENS) -> int:
    return HARD_SEED + max_givens


def givens_label(givens: int | tuple[int, int]) -> str:
    """44 -> "44"; (23, 36) -> "23-36" (metric names and the CLI's notation)."""
    return str(givens) if isinstance(givens, int) else f"{givens[0]}-{givens[1]}"


@dataclass
class SudokuStream:
    """An endless training stream: a pool of generated puzzles, each drawn through a random symmetry, while the
    pool keeps growing with fresh puzzles. State is one random.Random, so a resumed run continues the stream.

    With probability `pin_givens` an example's givens are fixed in its canvas (Example.fixed): never noised and not
    scored, as `sudoku solve` pins them at inference; the loss then falls on the empty cells and the EOS only."""

    seed: int = 0
    givens: tuple[int, int] = TRAIN_GIVENS
    pool_size: int = 2000
    fresh_per_batch: int = 2
    pin_givens: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.pool: list[tuple[list[int], list[int]]] = []

    def _fresh(self) -> None:
        puzzle, solution = make_puzzle(self.rng, self.rng.randint(*self.givens))
        if len(self.pool) < self.pool_size:
            self.pool.append((puzzle, solution))
        else:
            self.pool[self.rng.randrange(self.pool_size)] = (puzzle, solution)

    def next_batch(self, batch_size: int) -> list[Example]:
        while len(self.pool) < min(self.pool_size, 4 * batch_size):
            self._fresh()
        for _ in range(self.fresh_per_batch):
            self._fresh()
        out = []
        for _ in range(batch_size):
            puzzle, solution = shuffle_symmetry(*self.rng.choice(self.pool), self.rng)
            pinned = self.pin_givens > 0 and self.rng.random() < self.pin_givens  # no draw at 0: older streams hold
            fixed = [i for i, d in enumerate(puzzle) if d] if pinned else None
            out.append(Example(prompt_ids(puzzle), response_ids(solution), fixed))
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "pool": self.pool}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(_as_tuple(state["rng"]))
        self.pool = [(list(p), list(s)) for p, s in state["pool"]]


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- evaluation -------------------------------------------------------------------------------------------------

@dataclass
class SudokuScore:
    solved: int
    total: int
    mean_steps: float  # denoising steps per canvas

    @property
    def solve_rate(self) -> float:
        return self.solved / self.total if self.total else 0.0


def givens_steering(puzzle: list[int]) -> Steering:
    """Pin every given into the canvas at its cell, so no given can be overwritten."""
    return Steering(pinned={i: DIGIT0 + d for i, d in enumerate(puzzle) if d})


def repair_steering(grid: list[int], strength: float) -> Steering:
    """Start the canvas from a (partly wrong) grid, each cell renoised with probability `strength`."""
    return Steering(seed_tokens=[DIGIT0 + d for d in grid], strength=strength)


def corrupt(solution: list[int], cells: int, rng: random.Random) -> list[int]:
    """The solution with `cells` cells changed to another digit."""
    grid = list(solution)
    for i in rng.sample(range(CELLS), cells):
        grid[i] = rng.choice([d for d in range(1, 10) if d != solution[i]])
    return grid


# How an evaluation steers each puzzle's canvas: (puzzle, solution, rng) -> Steering or None
Steer = Callable[[list[int], list[int], random.Random], "Steering | None"]


def pin_givens(puzzle: list[int], solution: list[int], rng: random.Random) -> Steering:
    """Steer: the givens pinned (givens_steering)."""
    return givens_steering(puzzle)


def repair(wrong: int, strength: float) -> Steer:
    """Steer: each canvas seeded with its solution with `wrong` cells changed, renoised by `strength`."""
    return lambda puzzle, solution, rng: repair_steering(corrupt(solution, wrong, rng), strength)


def evaluate(model, puzzles: list[tuple[list[int], list[int]]], gen: GenerationConfig, batch_size: int = 100,
             seed: int = 0, steer: Steer | None = None,
             on_batch: Callable[[int], object] | None = None,
             on_answer: Callable[[list[int], list[int], "list[int] | None", int], object] | None = None) -> SudokuScore:
    """Solve every puzzle with `generate` (batched) and check the answers. `steer` steers each canvas (e.g.
    `pin_givens`, `repair(5, 0.2)`), drawing from one random.Random seeded with `seed`. `on_batch(n)` is called
    after each batch of n puzzles (a progress bar's update); `on_answer(puzzle, solution, grid, steps)` after each
    puzzle (grid None: the answer was not 81 digits)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    rng = random.Random(seed)
    solved, steps, canvases = 0, 0, 0
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        steering = None if steer is None else [steer(puzzle, solution, rng) for puzzle, solution in chunk]
        out = generate(model, [prompt_ids(p) for p, _ in chunk], gen, generator=g, steering=steering)
        for (puzzle, solution), ids, row_steps in zip(chunk, out.token_ids, out.steps_per_canvas):
            grid = decode_grid(ids)
            solved += grid is not None and is_solution(puzzle, grid)
            if on_answer is not None:
                on_answer(puzzle, solution, grid, sum(row_steps))
            steps += sum(row_steps)
            canvases += len(row_steps)
        if on_batch is not None:
            on_batch(len(chunk))
    return SudokuScore(solved, len(puzzles), steps / max(canvases, 1))


def one_step_cells(model, puzzles: list[tuple[list[int], list[int]]], batch_size: int = 100, seed: int = 0) -> float:
    """The share of the puzzles' empty cells that one denoising step from a fully noised canvas gets right (the
    default sampler capped at 1 step): a smooth figure that moves long before a small budget solves whole puzzles."""
    gen = sudoku_generation().replace(max_denoising_steps=1)
    g = torch.Generator(device=model.device).manual_seed(seed)
    right = empty = 0
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        out = generate(model, [prompt_ids(p) for p, _ in chunk], gen, generator=g)
        for (puzzle, solution), ids in zip(chunk, out.token_ids):
            cells = [c for c in range(CELLS) if not puzzle[c]]
            right += sum(1 for c in cells if c < len(ids) and ids[c] == DIGIT0 + solution[c])
            empty += len(cells)
    return right / max(empty, 1)
