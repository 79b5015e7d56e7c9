"""One denoising step, for any set of canvas rows. `generate` (lockstep, one generator) and the serving engine
(continuous batching, one generator per request) both call `denoise_step`; nothing else denoises.

Per step, for every stepped row that has not stopped this canvas:
  i.   decoder pass over the canvas, self-conditioned on the previous step's tempered probabilities;
  ii.  temper the logits (each row at its own step of its own schedule);
  iii. sample a token per position; accept the entropy-bound set; renoise the rest uniformly. Pinned positions
       (fixed by the caller, or the settled prefix) keep their token and count as certain (entropy 0). A
       constrained row's argmax and sample become the most probable canvases its constraint allows;
  iv.  stop the row once its argmax canvas is stable and its mean entropy is below the threshold, or its steps
       run out. A row that has stopped keeps its state until its canvas is restarted.

One noun per module: `state` (CanvasState), `step` (denoise_step), and the strategies its driver picks once:
`head` (BatchedHead | RowsHead: steps i-iii over the batch at once, or a row at a time), `draws` (SharedDraws |
PerRowDraws, each over an ExactSampler | FastSampler), `pick` (per row: Draw, optionally cut to top-k / top-p,
or Greedy), and `constraint`, the interface through which a row's constraint reaches the step (control
implements it; the step never imports control). `logprobs` records, for the rows that ask (a host flag per row:
a batch where none asks runs no extra kernel), each position's log-probabilities.
"""

from .constraint import CanvasConstraint, constrain_row
from .draws import PerRowDraws, Sampler, SharedDraws, TokenSampler, token_sampler
from .logprobs import TOP_LOGPROBS, record_row
from .head import BatchedHead, RowsHead, StepRows, Strategy, default_strategy, make_head
from .pick import DRAW, GREEDY, Draw, Greedy, Pick, pick_for
from .state import CanvasState
from .step import denoise_step

__all__ = ["BatchedHead", "CanvasConstraint", "CanvasState", "DRAW", "Draw", "GREEDY", "Greedy", "PerRowDraws",
           "Pick", "RowsHead", "Sampler", "SharedDraws", "StepRows", "Strategy", "TOP_LOGPROBS", "TokenSampler",
           "constrain_row", "default_strategy", "denoise_step", "make_head", "pick_for", "record_row", "token_sampler"]
