"""The callback that keeps the output folder's record as checkpoints are saved and stops a run whose weights
diverge, and the one-line report of a failure inside training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from functionalnetworkssft import checkpoints
from functionalnetworkssft.errors import FnsftError, describe_write_error, first_line
from functionalnetworkssft.outputs import OutputFolder


class Diverged(FnsftError):
    """A trained weight became NaN or infinite."""


class AlreadyTrained(Exception):
    """The checkpoint resumed from is the run's last step: nothing is left to train."""

    def __init__(self, step: int):
        super().__init__(f"step {step}")
        self.step = step


class RunGuard(TrainerCallback):
    """Keeps the output folder's record, marks each checkpoint complete once saved, and stops a run whose trained
    weights stop being finite before such weights can be saved."""

    def __init__(self, folder: OutputFolder, settings: dict[str, Any]):
        self.folder, self.settings = folder, settings
        self.saving: str | None = None
        self.last_saved: str | None = None
        self.restriction = None  # a functional-network UpdateRestriction, when training is masked
        self.args, self.step = None, 0

    def _before_save(self, state, control) -> None:
        if control.should_save and state.is_world_process_zero:
            self.saving = f"checkpoint-{state.global_step}"
            self.folder.record(self.saving)

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed at or past the last step, the Trainer would still run one more (it checks only after a step) and
        # save a checkpoint past --max_steps. The checkpoint's weights are loaded by now: stop before any step.
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(state, control)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        checkpoints.write_marker(Path(args.output_dir) / name, self.settings)
        self.saving, self.last_saved = None, name

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        if self.restriction is not None:
            self.restriction.restore()

        trained = [p.detach() for p in model.parameters() if p.requires_grad] if model is not None else []
        if not trained:
            return
        with torch.no_grad():
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(trained))).all())
        if not finite:
            raise self.diverged(args, state.global_step + 1)

    def on_step_begin(self, args, state, control, **kwargs):
        self.args, self.step = args, state.global_step + 1

    def diverged(self, args, step: int) -> Diverged:
        newest = self.last_saved or newest_checkpoint(Path(args.output_dir))
        kept = f"the newest good checkpoint is {newest}" if newest else "no checkpoint was saved"
        return Diverged(f"training diverged at step {step}: a trained weight became NaN or infinite, so the run "
                         f"stopped before saving it ({kept}). Lower --learning_rate (now {args.learning_rate:g}) "
                         "or check the data, then start again.")


def newest_checkpoint(out: Path) -> str | None:
    found = checkpoints.latest(out).path
    return found.name if found is not None else None


def train_steps(trainer, resume_path: str | None) -> dict[str, float]:
    """trainer.train, from the checkpoint if given; its metrics (none when the checkpoint ended the run)."""
    try:
        return dict(trainer.train(resume_from_checkpoint=resume_path).metrics)
    except AlreadyTrained as done:
        print(f"Nothing left to train: {Path(resume_path).name} is the run's last step ({done.step}).")
        return {}


def training_failure(exc: BaseException, guard: RunGuard, out: Path) -> BaseException:
    """The exception to report for a failure inside trainer.train: one line for what a user can fix."""
    if isinstance(exc, (FnsftError, KeyboardInterrupt)):
        return exc
    if isinstance(exc, RuntimeError) and "without overflow" in str(exc) and guard.args is not None:
        # The optimizer's own arithmetic overflowed (an update beyond float range): the same divergence, caught
        # one moment earlier than the finiteness check after the step.
        return guard.diverged(guard.args, guard.step)
    cause = describe_write_error(exc)
    if cause is None and guard.saving is None:
        return exc
    newest = newest_checkpoint(out)
    where = f"could not write {out / guard.saving}" if guard.saving else "could not write to the output folder"
    kept = (f"the newest complete checkpoint is {newest}: resume with --resume_from_checkpoint latest"
            if newest else "no complete checkpoint was saved")
    return FnsftError(f"{where}: {cause or first_line(exc)}; {kept}.")
