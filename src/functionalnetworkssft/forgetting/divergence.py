"""The divergences the probe measures and the guards train against, per token, in float32 whatever the model's
dtype (half-precision log-probabilities lose the small differences a forgetting measure is about)."""

from __future__ import annotations

# A logit this low has probability exactly 0 after softmax in float32, yet keeps every difference finite: the
# removed target contributes 0 * (finite) = 0 to the KL and to its gradient, where -inf would give NaN.
_REMOVED = -1e30


def masked_mean(values, mask=None):
    """Mean of `values` over the positions `mask` keeps (all of them without a mask); 0 when it keeps none."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_kl(tuned_logits, base_logits):
    """KL(p_base || p_tuned) at every position, in nats: [..., V] logits -> [...]."""
    import torch.nn.functional as F

    base = F.log_softmax(base_logits.float(), dim=-1)
    tuned = F.log_softmax(tuned_logits.float(), dim=-1)
    return (base.exp() * (base - tuned)).sum(-1)


def kl_to_base(tuned_logits, base_logits, mask=None):
    """Mean KL(p_base || p_tuned) per token over the positions `mask` keeps: the `kl` guard and the probe."""
    return masked_mean(token_kl(tuned_logits, base_logits), mask)


def masked_target_kl(tuned_logits, base_logits, targets, mask=None):
    """KL(base || tuned) over the vocabulary without the target token ("Mask the Target"): at each position both
    distributions lose the token the task trains towards and are renormalised over the rest, so the guard keeps the
    base's preferences among the alternatives without pulling against the task's own loss."""
    removed = targets.clamp(min=0).unsqueeze(-1)  # ignored positions (-100) are masked out below
    base = base_logits.float().scatter(-1, removed, _REMOVED)
    tuned = tuned_logits.float().scatter(-1, removed, _REMOVED)
    return kl_to_base(tuned, base, mask)


def replay_nll(tuned_logits, targets, mask=None):
    """Mean negative log-likelihood of `targets` (next tokens, aligned with the logits): the `replay` guard."""
    import torch.nn.functional as F

    nll = F.cross_entropy(tuned_logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return masked_mean(nll, mask)
