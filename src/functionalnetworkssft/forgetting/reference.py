"""Where the base model's next-token distribution comes from while the model trains.

- The guards, LoRA and QLoRA: the same model with its adapter switched off (no extra weights, exact).
- The guards, full fine-tuning: a frozen copy of the base, made before training (exact; refused where it cannot fit).
- The probe: the base's top-k log-probabilities on its fixed windows, computed once before training from the base
  itself (bounded memory, one forward per later measurement; the KL's approximation error is stated in `TopK`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

# On an adapter the quickstart trained (with the replay guard; exact KL 0.082) the lumped tail made the KL 10.7% low
# at k = 256, 4.3% at 1024 and 1.1% at 4096 (benchmarks/forgetting_cost.json): 4096 it is, 33 MB for the probe's
# 1,008 positions.
TOP_K = 4096


class AdapterOff:
    """The base is the PEFT model with its adapter disabled, in evaluation mode (dropout would make the target
    random), and with training-only hooks paused (`pause`, set by the run: --mask_forward's)."""

    describe = "the base: the same model with the adapter switched off"

    def __init__(self):
        self.pause = contextlib.nullcontext

    def logits(self, model, **batch):
        import torch

        with torch.no_grad(), self.pause(), model.disable_adapter(), evaluating(model):
            return model(**batch).logits


@contextlib.contextmanager
def evaluating(model):
    """`model` in evaluation mode, each module's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class FrozenCopy:
    """A frozen copy of the base, taken before training changes it."""

    describe = "the base: a frozen copy taken before training"

    def __init__(self, model):
        import copy

        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def logits(self, model, **batch):
        import torch

        device = next(iter(batch.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)  # made before the Trainer placed the model it copies
        with torch.no_grad():
            return self.model(**batch).logits


def copy_problem(model, flag: str) -> str | None:
    """Why a frozen copy of `model` cannot fit beside its training, or None: the copy, plus the gradients and the
    two AdamW moments that full fine-tuning already needs, must fit in the memory free on the model's device."""
    import torch

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    device = next(model.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = str(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
        where = "this machine"
    needed = size + 3 * trained
    if device.type != "cuda":  # every process of a data-parallel run on this machine makes its own copy
        import os

        needed *= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if needed <= free:
        return None
    return (f"{flag} with full fine-tuning keeps a frozen copy of the base ({_size(size)}) beside the training's "
            f"gradients and optimizer state: {_size(needed)}, and {where} has {_size(free)} free; add --use_peft (the "
            "base is then the adapter switched off, no copy) or use --forgetting_guard none.")


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


@dataclass
class TopK:
    """The base's top-k log-probabilities at each position of fixed windows, plus the probability left over.

    KL(base || tuned) is then sum_topk p (log p - log q) + r (log r - log q_rest), where r and q_rest are the base's
    and the tuned model's probability outside the base's top k. By the log-sum inequality the lumped tail term
    never exceeds the true tail's contribution, so this is a lower bound of the exact KL that meets it as r -> 0;
    tests/test_forgetting.py measures the gap."""

    values: object  # [N, T, k] float32 log-probabilities
    indices: object  # [N, T, k] int32 token ids
    nll: float  # the base's NLL per token on the windows
    describe = f"the base's top-{TOP_K} log-probabilities and the rest's total, read once before training"

    @classmethod
    def of(cls, model, windows, k: int = TOP_K) -> TopK:
        import torch

        values, indices, nll = [], [], 0.0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in windows.split(8):
                batch = batch.to(device)
                logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
                nll += float(-logp.gather(-1, batch[:, 1:, None]).sum())
                top = logp.topk(min(k, logp.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                indices.append(top.indices.to(torch.int32).cpu())
        return cls(torch.cat(values), torch.cat(indices), nll / windows[:, 1:].numel())

    def kl(self, tuned_logp, rows: slice):
        """Per-position KL of the windows `rows` against the tuned model's log-probabilities [n, T, V]."""
        import torch

        values = self.values[rows].to(tuned_logp.device)
        indices = self.indices[rows].to(tuned_logp.device, torch.long)
        p = values.exp()
        tuned = tuned_logp.gather(-1, indices)
        head = (p * (values - tuned)).sum(-1)
        rest = (1 - p.sum(-1)).clamp(min=0)
        tuned_rest = (1 - tuned.exp().sum(-1)).clamp(min=1e-12)
        tail = torch.where(rest > 0, rest * (rest.clamp(min=1e-12).log() - tuned_rest.log()), torch.zeros_like(rest))
        return head + tail

    def top1(self, rows: slice):
        return self.indices[rows][..., 0].long()
