"""The forgetting probe: how far the model's next-token distribution on general text has moved from the base's,
measured at the start, at every evaluation and at the end of a run."""

from __future__ import annotations

import contextlib

from functionalnetworkssft.forgetting.divergence import token_kl
from functionalnetworkssft.forgetting.reference import TopK

# Logged like eval_loss, so every report_to tracker receives them.
KL_KEY, AGREEMENT_KEY, NLL_KEY = "forgetting_kl", "base_agreement", "forgetting_nll_change"


class ForgettingProbe:
    """KL(base || tuned) in nats per token, top-1 agreement with the base, and the change of the NLL, on fixed
    windows of general text. `base` is where the base's distribution comes from (`reference`)."""

    def __init__(self, windows: list[list[int]], base, batch_size: int = 8):
        import torch

        self.windows = torch.tensor(windows, dtype=torch.long)
        self.base, self.batch_size = base, batch_size
        self.base_nll: float | None = None
        self.history: list[dict[str, float]] = []
        # Weights change only with an optimizer step, so a second measurement at the same step (the final
        # evaluation right after training's end) is the first one again; not so when the best checkpoint is loaded
        # back at the end.
        self.reuse_same_step = True
        # Measures the model as it is saved: training-only hooks (--mask_forward's) are paused inside this context.
        self.pause = contextlib.nullcontext

    def restore(self, log_history: list[dict]) -> None:
        """The measurements a resumed run made before its checkpoint, from the Trainer's log (kept in the
        checkpoint), so that the record holds the whole run."""
        keys = (KL_KEY, AGREEMENT_KEY, NLL_KEY)
        restored: dict[int, dict[str, float]] = {}
        for entry in log_history:
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and all(
                    isinstance(entry.get(f"eval_{k}"), (int, float)) for k in keys):
                restored[entry["step"]] = {"step": entry["step"], **{k: float(entry[f"eval_{k}"]) for k in keys}}
        self.history = [restored[step] for step in sorted(restored)] + [
            h for h in self.history if h.get("step") not in restored]

    @property
    def tokens(self) -> int:
        return int(self.windows[:, 1:].numel())

    def measure(self, model, step: int | None = None) -> dict[str, float]:
        """The three numbers for `model` (a PEFT model when the base is its adapter switched off)."""
        import torch

        if self.reuse_same_step and step is not None and self.history and self.history[-1].get("step") == step:
            return {k: v for k, v in self.history[-1].items() if k != "step"}
        snapshot = isinstance(self.base, TopK)
        if step == 0 and snapshot and untrained(model):
            # Before the first optimizer step the model is its base, exactly: nothing to run.
            self.base_nll = self.base.nll
            result = {KL_KEY: 0.0, AGREEMENT_KEY: 1.0, NLL_KEY: 0.0}
            self.history.append({"step": step, **result})
            return result
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        kl_sum = agree = nll_sum = base_nll_sum = 0.0
        try:
            with torch.no_grad(), self.pause():
                for start in range(0, len(self.windows), self.batch_size):
                    rows = slice(start, start + self.batch_size)
                    ids = self.windows[rows].to(device)
                    targets = ids[:, 1:]
                    tuned = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
                    nll_sum += float(-tuned.gather(-1, targets[..., None]).sum())
                    if snapshot:
                        kl_sum += float(self.base.kl(tuned, rows).sum())
                        agree += float((self.base.top1(rows).to(device) == tuned.argmax(-1)).sum())
                    else:
                        base = self.base.logits(model, input_ids=ids, use_cache=False)[:, :-1]
                        kl_sum += float(token_kl(tuned, base).sum())
                        agree += float((base.argmax(-1) == tuned.argmax(-1)).sum())
                        if self.base_nll is None:
                            base_logp = torch.log_softmax(base.float(), -1)
                            base_nll_sum += float(-base_logp.gather(-1, targets[..., None]).sum())
        finally:
            model.train(was_training)
        count = self.tokens
        nll = nll_sum / count
        if self.base_nll is None:
            self.base_nll = self.base.nll if snapshot else base_nll_sum / count
        # A KL is never negative; float rounding around an unchanged model can make the sum a hair below 0.
        result = {KL_KEY: max(0.0, kl_sum / count), AGREEMENT_KEY: agree / count, NLL_KEY: nll - self.base_nll}
        if step is not None and self.history and self.history[-1].get("step") == step:
            self.history.pop()  # measured again at the same step (the final evaluation after training's end)
        self.history.append({"step": step, **result} if step is not None else dict(result))
        return result


def untrained(model) -> bool:
    """Whether `model`, before its first optimizer step, computes exactly what its base does: its own weights are
    the base's, and a fresh LoRA adds B A = 0 (B starts at zero). DoRA's rescaling is the identity only in exact
    arithmetic, so it is measured."""
    import torch

    if not hasattr(model, "peft_config"):
        return True
    for name, parameter in model.named_parameters():
        if "lora_magnitude_vector" in name:
            return False
        if "lora_B" in name and torch.count_nonzero(parameter):
            return False
    return True
