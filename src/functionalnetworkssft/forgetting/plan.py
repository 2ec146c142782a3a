"""What a run does about forgetting, decided once before training: the general text, the probe, the guard and
where the base's distribution comes from; and what it reports afterwards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.forgetting import reference, text
from functionalnetworkssft.forgetting.guard import ForgettingGuard, guard_weight, windows_per_micro_batch
from functionalnetworkssft.forgetting.probe import AGREEMENT_KEY, KL_KEY, NLL_KEY, ForgettingProbe


@dataclass
class ForgettingPlan:
    probe: ForgettingProbe | None
    guard: ForgettingGuard | None
    origin: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, cfg, model, tokenizer, fingerprint: str, tokens_per_example: float = 0.0) -> ForgettingPlan | None:
        """The plan of a run (None when it neither measures nor guards). `model` is the base, before training;
        `tokens_per_example` the training set's mean, which sets how much general text the guard reads per step."""
        from functionalnetworkssft import distributed

        from functionalnetworkssft.generate import context_length

        probing = cfg.forgetting_probe == "on"
        kind = cfg.forgetting_guard
        weight = guard_weight(kind, cfg.forgetting_weight)
        guarding = kind != "none" and weight > 0  # lambda = 0 is the plain run, to the bit
        if _sharded(cfg) and (probing or guarding):
            # The probe and the guards run their own forwards of the model, which sharded weights allow only
            # through the sharding wrapper.
            if guarding:
                raise UsageError(f"--forgetting_guard {kind} cannot run under FSDP or DeepSpeed, which shard the "
                                 "weights its own forwards read; train data-parallel (torchrun) or use "
                                 "--forgetting_guard none.")
            if distributed.is_main():
                print("Forgetting probe: off under FSDP or DeepSpeed (sharded weights); train data-parallel to "
                      "measure it, or add --forgetting_probe off to say so.")
            probing = False
        streaming = guarding and kind in ("kl", "replay")
        if cfg.forgetting_dataset and not (probing or streaming) and distributed.is_main():
            print(f"--forgetting_dataset {cfg.forgetting_dataset} is not read: only the probe and the kl and replay "
                  "guards read general text, and this run uses none of them.")
        if not probing and not guarding:
            return None
        needed = max([text.PROBE_TOKENS] * probing + [text.WINDOW_TOKENS] * streaming, default=0)
        limit = context_length(model)
        if limit is not None and needed > limit:
            raise UsageError(f"the model reads at most {limit} tokens, fewer than the {needed}-token windows of "
                             f"general text the forgetting {'guard' if streaming else 'probe'} reads; use "
                             "--forgetting_probe off and --forgetting_guard none or masked_kl.")
        _onto_training_device(model, cfg)
        if cfg.forgetting_dataset and (probing or streaming):
            general = text.split(text.from_file(cfg.forgetting_dataset, tokenizer, cfg.max_seq_length),
                                 Path(cfg.forgetting_dataset).name)
        else:
            seed = cfg.seed
            probe_windows = text.generated(model, tokenizer, text.PROBE_WINDOWS, seed, fingerprint, text.PROBE_TOKENS)
            stream = text.generated(model, tokenizer, text.GUARD_WINDOWS, seed + 1, fingerprint) if streaming else []
            stream, dropped = text.disjoint(stream, probe_windows)
            general = text.GeneralText(probe_windows, stream, "text the base model wrote from neutral prompts",
                                       dropped)
        if streaming and not general.stream:
            where = (f"--forgetting_dataset {cfg.forgetting_dataset}: no window of its text" if cfg.forgetting_dataset
                     else "no window of the text the base wrote")
            raise UsageError(f"{where} is left for the guard once those that share a {text.NGRAM}-token sequence "
                             "with the probe's are removed; give more (and more varied) text with "
                             "--forgetting_dataset.")
        base = None
        if guarding:
            if cfg.use_peft:
                base = reference.AdapterOff()
            else:
                problem = reference.copy_problem(model, f"--forgetting_guard {kind}")
                if problem:
                    raise UsageError(problem)
                base = reference.FrozenCopy(model)
        probe = None
        if probing:
            import torch

            # The base's distribution on the probe's text never changes: read once, now, from the model before
            # training, so that each later measurement is a single forward of the tuned model.
            probe = ForgettingProbe(general.probe, reference.TopK.of(model, torch.tensor(general.probe)))
            probe.reuse_same_step = not cfg.load_best_model_at_end
        task_tokens = cfg.per_device_train_batch_size * (cfg.max_seq_length if cfg.packing else tokens_per_example)
        per_step = windows_per_micro_batch(cfg.forgetting_guard_share, task_tokens, text.WINDOW_TOKENS)
        guard = ForgettingGuard(kind, weight, general.stream, base, distributed.rank(), distributed.world_size(),
                                per_step) if guarding else None
        details = {"text": general.origin}
        if probe is not None:
            details.update(probe_windows=len(general.probe), probe_window_tokens=len(general.probe[0]),
                           probe_base_distribution=probe.base.describe)
        if guard is not None:
            details["guard"] = {"kind": kind, "weight": weight, "base_distribution": base.describe,
                                "window_tokens": text.WINDOW_TOKENS}
            if streaming:
                details["guard"].update(stream_windows=len(general.stream), windows_per_micro_batch=guard.per_step,
                                        dropped_for_sharing_ngrams_with_probe=general.dropped, ngram=text.NGRAM)
        return cls(probe, guard, general.origin, details)

    def pause_while_measuring(self, pause) -> None:
        """Run the probe's and the base's forwards inside `pause()`, which switches training-only hooks off
        (--mask_forward's): the probe measures the model as it is saved, and the base is the base."""
        if self.probe is not None:
            self.probe.pause = pause
        if self.guard is not None and isinstance(self.guard.base, reference.AdapterOff):
            self.guard.base.pause = pause

    def record(self) -> dict[str, Any]:
        """For fnsft_training.json and the model card."""
        out = dict(self.details)
        if self.probe is not None and self.probe.history:
            out["measurements"] = self.probe.history
        return out

    def summary(self) -> str | None:
        """The final measurement in words."""
        if self.probe is None or not self.probe.history:
            return None
        last = self.probe.history[-1]
        kl, agreement, nll = last[KL_KEY], last[AGREEMENT_KEY], last[NLL_KEY]
        guard = (f" Trained with the {self.guard.kind} guard (weight {self.guard.weight:g})."
                 if self.guard is not None else " --forgetting_guard kl holds it down.")
        return (f"Forgetting: on {self.probe.tokens} tokens of {self.origin}, the tuned model's next-token choice "
                f"agrees with the base's {agreement:.1%} of the time; KL(base||tuned) is {kl:.4f} nats per token and "
                f"its NLL there {'rose' if nll > 0 else 'fell'} by {abs(nll):.4f} nats per token.{guard}")


def _onto_training_device(model, cfg) -> None:
    """A base loaded on the CPU goes to the GPU it will train on now, not when the Trainer moves it: writing the
    base's text and reading its distribution on the CPU would take minutes for a model of billions of weights. Left
    alone under DeepSpeed or FSDP, which place (and shard) the model themselves."""
    import os

    import torch

    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cpu" or _sharded(cfg):
        return
    model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0)))


def _sharded(cfg) -> bool:
    """Whether the run shards the model (FSDP or DeepSpeed, from the config file's trainer: or accelerate's launch)."""
    import os

    if any(cfg.trainer_overrides.get(key) for key in ("deepspeed", "fsdp")):
        return True
    return any(os.environ.get(name, "").lower() in ("1", "true") for name in ("ACCELERATE_USE_FSDP",
                                                                               "ACCELERATE_USE_DEEPSPEED"))


def fingerprint(source, cfg) -> str:
    """The base model as its files and loading settings make it: what cached generated text depends on."""
    digest = hashlib.sha256(json.dumps([source.path, cfg.torch_dtype, cfg.use_4bit, cfg.use_8bit]).encode())
    folder = Path(source.path)
    if folder.is_dir():
        for item in sorted(folder.iterdir()):
            if item.suffix in (".safetensors", ".bin", ".json", ".gguf") and item.is_file():
                stat = item.stat()
                digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
