"""Distillation of a draft for a given target (`slm distill`): the target answers prompts from a
corpus, and a small head reading its hidden states learns to guess its next tokens.

- `prompts`: requests and continuations from a source tree, HumanEval excluded.
- `samples`: the target's own answers (batched decoding) and the draft vocabulary (FR-Spec).
- `cache`: the target's features and top next tokens at every position, computed once (kept
  while an slm target answers), so training runs only the head.
- `objective`: the loss (the target's distribution, over the draft vocabulary, at each
  training-time-test depth) and the acceptance per draft position.
- `train`: the time-budgeted, resumable training loop.
- `run`: `distill()`, the whole pipeline.
The head and its draft are in `slm.speculative.head` / `slm.speculative.features`.
"""

from slm.distill.run import DistillConfig, distill
from slm.distill.train import TrainSettings

__all__ = ["DistillConfig", "TrainSettings", "distill"]
