"""Speculative decoding's parts: a cheap draft proposes tokens, the target verifies them all in one
forward pass, and the output is exactly the target's (greedy) or distributed exactly as the
target's own sampling. The loop itself is `slm.generate.generate` (with `draft=`).

- `schedule`: how many tokens to draft (the offer/plan/propose/record protocol, FixedK,
  AdaptiveK) and the one speedup formula.
- `drafts`: draft sources (a model with its own KV cache, the target's quantized copy sharing
  the target's cache, prompt-lookup n-grams). `slm.load.load_draft` resolves a `--draft` value.
- `verify`: greedy verification and modified rejection sampling.
- `lm`: the minimal model interface the loop needs, for slm and transformers models.
"""

from slm.speculative.drafts import Draft, HybridDraft, ModelDraft, NgramDraft, Proposal, SelfDraft, as_draft
from slm.speculative.lm import HFLM, CachedLM, SlmLM, as_lm
from slm.speculative.schedule import (
    AdaptiveK, FixedK, Offer, Plan, Round, break_even_acceptance, expected_tokens, parse_draft_tokens,
    predicted_speedup,
)
from slm.speculative.verify import rejection_sample, verify_greedy

__all__ = [
    "HFLM", "AdaptiveK", "CachedLM", "Draft", "FixedK", "HybridDraft", "ModelDraft", "NgramDraft", "Offer", "Plan",
    "Proposal", "Round", "SelfDraft", "SlmLM", "as_draft", "as_lm", "break_even_acceptance", "expected_tokens",
    "parse_draft_tokens", "predicted_speedup", "rejection_sample", "verify_greedy",
]
