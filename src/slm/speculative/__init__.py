"""Speculative decoding: a cheap draft proposes tokens, the target verifies them all in one
forward pass, and the output is exactly the target's (greedy) or distributed exactly as the
target's own sampling.

- `engine`: the draft/verify loop, greedy verification, modified rejection sampling.
- `schedule`: how many tokens to draft (fixed K, or adaptive from measured acceptance and cost).
- `drafts`: draft sources (a model with its own KV cache, the target's quantized copy sharing
  the target's cache, prompt-lookup n-grams), `load_draft`.
- `lm`: the minimal model interface the loop needs, for slm models; `hf`: for transformers models.
"""

from slm.speculative.drafts import (
    Draft, HybridDraft, ModelDraft, NgramDraft, Proposal, SelfDraft, check_same_vocabulary, load_draft,
)
from slm.speculative.engine import parse_draft_tokens, rejection_sample, speculative_generate, verify_greedy
from slm.speculative.lm import CachedLM, SlmLM, as_lm
from slm.speculative.schedule import AdaptiveK, FixedK

__all__ = [
    "AdaptiveK", "CachedLM", "Draft", "FixedK", "HybridDraft", "ModelDraft", "NgramDraft", "Proposal", "SelfDraft", "SlmLM",
    "as_lm",
    "check_same_vocabulary", "load_draft", "parse_draft_tokens", "rejection_sample", "speculative_generate",
    "verify_greedy",
]
