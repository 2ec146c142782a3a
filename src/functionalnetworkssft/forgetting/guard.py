"""The forgetting guards: a term added to the task's loss at every training step that keeps the tuned model's
behaviour close to the base's.

- `kl`: lambda * KL(base || tuned) on windows of general text, a few per step from a stream disjoint from the probe.
- `masked_kl`: lambda * KL(base || tuned) on the training batch itself, over the vocabulary without the target
  token ("Mask the Target"): no general text needed, and no pull against the task's own loss.
- `replay`: lambda * the language-modelling loss on the general-text stream.

The stream's position is a function of the optimizer step and the micro-batch within it (and of the process in a
data-parallel run), so a resumed run reads exactly the windows the uninterrupted run would have.
"""

from __future__ import annotations

from functionalnetworkssft.forgetting.divergence import kl_to_base, masked_target_kl, replay_nll

GUARDS = ("none", "kl", "masked_kl", "replay")
WINDOWS_PER_STEP = 4
# The guard's logits are windows x 96 x vocabulary floats, several times over in the KL and its backward: 16
# windows of a 128k vocabulary are about 0.8 GB per copy.
MAX_WINDOWS = 16
# lambda when --forgetting_weight is not given: kl, the pilot's setting (93% of the gain kept at 96% less KL);
# masked_kl, 1: at 10 it kept 28% of the task's gain in the quick benchmark (its KL is taken on the very positions
# the task trains); replay's loss is an NLL of a few nats, so it needs no amplification.
DEFAULT_WEIGHTS = {"kl": 10.0, "masked_kl": 1.0, "replay": 1.0}


def guard_weight(kind: str, given: float | None) -> float:
    """The weight lambda a run uses: --forgetting_weight, else the guard's default (0 for no guard)."""
    return given if given is not None else DEFAULT_WEIGHTS.get(kind, 0.0)


def windows_per_micro_batch(share: float, task_tokens: float, window_tokens: int) -> int:
    """How many general-text windows guard a micro-batch of `task_tokens` tokens (--forgetting_guard_share). A
    guard token costs about 1.4 task tokens (its forward and backward, plus the base's forward), so the default
    share of 0.25 keeps a guarded step near a third dearer than a plain one (benchmarks/forgetting_cost.py)."""
    return max(1, min(MAX_WINDOWS, round(share * task_tokens / window_tokens)))


class ForgettingGuard:
    def __init__(self, kind: str, weight: float, stream: list[list[int]], base, rank: int = 0, world: int = 1,
                 per_step: int = WINDOWS_PER_STEP):
        import torch

        self.kind, self.weight, self.base = kind, weight, base
        self.stream = torch.tensor(stream, dtype=torch.long) if stream else None
        self.rank, self.world, self.per_step = rank, world, per_step
        self._step, self._micro = -1, 0

    def advance(self, step: int, accumulation: int) -> int:
        """The run-wide index of this micro-batch: the optimizer step's first micro-batch, plus how many of that
        step's came before it (the Trainer calls the loss once per micro-batch, in order)."""
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        return step * accumulation + self._micro

    def windows(self, micro_step: int):
        """The windows of the `micro_step`-th micro-batch of the run (counted from its first step, on this process),
        cycling through the stream."""
        import torch

        count = len(self.stream)
        first = (micro_step * self.world + self.rank) * self.per_step
        return self.stream[torch.arange(first, first + self.per_step) % count]

    def stream_term(self, model, micro_step: int):
        """The kl or replay term on this micro-batch's general-text windows (`model` unwrapped from any DDP)."""
        ids = self.windows(micro_step).to(next(model.parameters()).device)
        tuned = model(input_ids=ids, use_cache=False).logits[:, :-1]
        if self.kind == "replay":
            return replay_nll(tuned, ids[:, 1:])
        return kl_to_base(tuned, self.base.logits(model, input_ids=ids, use_cache=False)[:, :-1])

    def batch_term(self, model, inputs, tuned_logits):
        """The masked_kl term on the training batch: at the positions the task trains."""
        targets = inputs["labels"][:, 1:]
        keep = targets != -100
        # No KV cache: only then does the model build a padding-free row's attention from its restarting positions.
        batch = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
        base = self.base.logits(model, **batch)[:, :-1][keep]
        return masked_target_kl(tuned_logits[:, :-1][keep], base, targets[keep])


def guarded_loss(trainer, guard: ForgettingGuard, model, inputs, num_items_in_batch, task_loss):
    """The task's loss plus the guard's term, for one micro-batch of TRL's training step.

    `task_loss(model, inputs, num_items_in_batch)` is TRL's own loss. The Trainer divides what this returns by the
    accumulation steps unless the loss is already normalised over the whole step; the guard's term, a mean over
    this micro-batch, is scaled to match, so lambda means the same at any --gradient_accumulation_steps."""
    import torch
    import torch.nn.functional as F

    unwrapped = trainer.accelerator.unwrap_model(model)
    micro_step = guard.advance(trainer.state.global_step, trainer.current_gradient_accumulation_steps)
    if guard.kind == "masked_kl":
        # TRL's fused head never builds the logits this term needs: one forward gives them, and the task's loss is
        # computed from them exactly as TRL computes it.
        # A mixture of experts' router loss too, as TRL adds it.
        aux = getattr(trainer, "aux_loss_enabled", False)
        inputs = {**inputs, "use_cache": False, **({"output_router_logits": True} if aux else {})}
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs.logits
        targets = inputs["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(count).clamp(min=1)
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * trainer.accelerator.num_processes
        if aux and getattr(outputs, "aux_loss", None) is not None:
            steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + trainer.router_aux_loss_coef * outputs.aux_loss / steps
        term = guard.batch_term(unwrapped, {k: v for k, v in inputs.items() if k != "output_router_logits"}, logits)
        _token_metrics(trainer, logits, targets)
    else:
        loss = task_loss(model, inputs, num_items_in_batch)
        term = guard.stream_term(unwrapped, micro_step)
    metrics = getattr(trainer, "_metrics", None)  # TRL averages these into each training log record
    if metrics is not None:
        metrics["train"]["forgetting_guard_loss"].append(float(term.detach()))
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) \
            or trainer.compute_loss_func is not None
    factor = 1.0 / trainer.current_gradient_accumulation_steps if scaled else 1.0
    return loss + (guard.weight * factor) * term


def _token_metrics(trainer, logits, targets) -> None:
    """TRL's entropy and token accuracy, which its own loss would have logged, over every process's tokens."""
    import torch

    metrics = getattr(trainer, "_metrics", None)
    if metrics is None:
        return
    with torch.no_grad():
        keep = targets != -100
        logp = logits[:, :-1][keep].float().log_softmax(-1)
        gather = trainer.accelerator.gather_for_metrics
        valid = gather(keep.sum()).sum()
        entropy = gather(-(logp.exp() * logp).sum()).sum()
        correct = gather((logp.argmax(-1) == targets[keep]).sum()).sum()
        metrics["train"]["entropy"].append(float(entropy / valid) if valid > 0 else 0.0)
        metrics["train"]["mean_token_accuracy"].append(float(correct / valid) if valid > 0 else 0.0)
