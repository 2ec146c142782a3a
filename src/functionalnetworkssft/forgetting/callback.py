"""The probe's measurements at the two ends of training, in the Trainer's log like an evaluation's."""

from __future__ import annotations

from transformers import TrainerCallback

from functionalnetworkssft.forgetting.probe import ForgettingProbe


class ProbeAtEnds(TrainerCallback):
    """The forgetting probe at the start of training and at its end, logged like an evaluation (the evaluations in
    between measure it in their own record)."""

    def __init__(self, probe: ForgettingProbe):
        self.probe, self.trainer = probe, None

    def _log(self, state) -> None:
        last = self.probe.history[-1] if self.probe.history else {}
        if self.probe.reuse_same_step and last.get("step") == state.global_step:
            return  # this step's evaluation measured it already
        trainer = self.trainer
        measured = self.probe.measure(trainer.accelerator.unwrap_model(trainer.model), state.global_step)
        trainer.log({f"eval_{key}": value for key, value in measured.items()})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the checkpoint's log holds what was measured before it
            self.probe.restore(state.log_history)
        self._log(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._log(state)
