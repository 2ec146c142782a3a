"""How much a fine-tune forgot, and guards that keep it small.

- `divergence`: KL(base || tuned), its target-masked variant and the replay loss, per token.
- `text`: the general text (the user's, or the base's own writing), cut into windows; probe and guard disjoint.
- `reference`: where the base's distribution comes from (adapter off, frozen copy, or a top-k snapshot).
- `probe`: KL, top-1 agreement and NLL change on the probe's windows.
- `guard`: the kl, masked_kl and replay terms added to the task's loss.
- `plan`: what a run does about forgetting, and what it reports.
- `callback`: the probe at the start and the end of training, in the Trainer's log.
"""

from functionalnetworkssft.forgetting.callback import ProbeAtEnds
from functionalnetworkssft.forgetting.guard import DEFAULT_WEIGHTS, GUARDS, ForgettingGuard, guard_weight, guarded_loss
from functionalnetworkssft.forgetting.plan import ForgettingPlan, fingerprint
from functionalnetworkssft.forgetting.probe import AGREEMENT_KEY, KL_KEY, NLL_KEY, ForgettingProbe

__all__ = ["AGREEMENT_KEY", "DEFAULT_WEIGHTS", "GUARDS", "KL_KEY", "NLL_KEY", "ForgettingGuard", "ForgettingPlan",
           "ForgettingProbe", "ProbeAtEnds", "fingerprint", "guard_weight", "guarded_loss"]
