"""Resume always works after a kill: `latest` is the newest complete checkpoint (a checkpoint cut short by SIGKILL or
a full disk is skipped, and said so), and a checkpoint that cannot fit the flags is refused before loading."""

from __future__ import annotations

import json
import resource
import shutil

import pytest

from conftest import TOY, write_jsonl
from hostile import cli, error_lines, no_traceback, one_line, run_fnsft

KILL_WHILE_SAVING = """
import os, signal, sys, torch

real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if str(f).endswith(os.path.join(os.environ["KILL_IN"], "optimizer.pt")):
        with open(f, "r+b") as handle:  # the kill lands in the middle of the file
            handle.truncate(os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save

from functionalnetworkssft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", out, "--use_peft",
            "--save_steps", "2", "--validation_split", "0", "--per_device_train_batch_size", "2", *extra]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", TOY[:16])


def test_latest_skips_a_checkpoint_killed_mid_write_and_the_run_finishes(tiny_llama, tmp_path, data, capsys):
    out = tmp_path / "out"
    killed = run_fnsft(*args(tiny_llama, data, out, "--max_steps", "6"), env={"KILL_IN": "checkpoint-4"},
                       code=KILL_WHILE_SAVING)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not (out / "checkpoint-4" / "trainer_state.json").exists()

    code, errors, _ = cli(capsys, *args(tiny_llama, data, out, "--max_steps", "6", "--resume_from_checkpoint",
                                        out / "checkpoint-4"))
    assert code == 2
    one_line(errors, f"--resume_from_checkpoint {out / 'checkpoint-4'}: not a complete Trainer checkpoint",
             "no trainer_state.json")

    code, errors, printed = cli(capsys, *args(tiny_llama, data, out, "--max_steps", "6", "--resume_from_checkpoint",
                                              "latest"))
    assert code == 0, errors
    assert "Skipped checkpoint-4: incomplete (no trainer_state.json (the save did not finish)); removed it." in printed
    assert f"Resuming from {out / 'checkpoint-2'}" in printed
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert (out / "checkpoint-4" / "fnsft_checkpoint.json").is_file()  # saved again, whole, on the way to step 6


def test_latest_skips_checkpoints_whose_files_are_cut_short(tiny_llama, tmp_path, data, capsys):
    out = tmp_path / "out"
    assert cli(capsys, *args(tiny_llama, data, out, "--max_steps", "4"))[0] == 0
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # marked complete, then cut short: the sizes disagree
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / "fnsft_checkpoint.json").unlink()  # no marker: judged by its structure
    (out / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # header length 2^64-1

    from functionalnetworkssft.checkpoints import latest

    found = latest(out)
    assert found.path == out / "checkpoint-4"
    assert [(p.name, why.split(" (")[0]) for p, why in found.skipped] == [
        ("checkpoint-8", "adapter_model.safetensors: its header claims 18446744073709551615 bytes but the file has 10"),
        ("checkpoint-6", f"adapter_model.safetensors has {weights.stat().st_size} bytes, "
                         f"{weights.stat().st_size + 100} were written")]


def test_a_full_disk_while_checkpointing_is_one_line_and_latest_resumes_from_the_last_whole_one(tiny_llama, tmp_path,
                                                                                                data, capsys):
    out = tmp_path / "out"
    assert cli(capsys, *args(tiny_llama, data, out, "--max_steps", "2"))[0] == 0
    # Files above 100 kB cannot be written (ulimit -f): the adapter fits, the optimizer state of checkpoint-4 not.
    limit = 100_000
    full = run_fnsft(*args(tiny_llama, data, out, "--max_steps", "4", "--resume_from_checkpoint", "latest"),
                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 1, full.stderr[-3000:]
    no_traceback(full.stderr)
    one_line(error_lines(full.stderr), f"could not write {out / 'checkpoint-4'}:",
             "the newest complete checkpoint is checkpoint-2: resume with --resume_from_checkpoint latest")
    assert json.loads((out / "fnsft_outputs.json").read_text())["status"] == "failed"

    code, errors, printed = cli(capsys, *args(tiny_llama, data, out, "--max_steps", "4", "--resume_from_checkpoint",
                                              "latest"))
    assert code == 0, errors
    assert "Skipped checkpoint-4: incomplete" in printed and f"Resuming from {out / 'checkpoint-2'}" in printed
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("flags, needle", [
    (["--lora_r", "8"], "--lora_r 8 differs from the 16 that checkpoint-2 was trained with"),
    (["--lora_target_modules", "q_proj"], "--lora_target_modules q_proj differs from the all-linear"),
])
def test_resuming_with_settings_that_change_shapes_is_refused_before_loading(tiny_llama, tmp_path, data, capsys,
                                                                             flags, needle):
    out = tmp_path / "out"
    assert cli(capsys, *args(tiny_llama, data, out, "--max_steps", "2"))[0] == 0
    code, errors, printed = cli(capsys, *args(tiny_llama, data, out, "--max_steps", "4", "--resume_from_checkpoint",
                                              "latest", *flags))
    assert code == 2
    one_line(errors, needle, "resume with")
    assert "Data:" not in printed  # refused before the data, let alone the model, was read


def test_resuming_a_lora_checkpoint_as_full_fine_tuning_is_refused(tiny_llama, tmp_path, data, capsys):
    out = tmp_path / "out"
    assert cli(capsys, *args(tiny_llama, data, out, "--max_steps", "2"))[0] == 0
    no_peft = [a for a in args(tiny_llama, data, out, "--max_steps", "4", "--resume_from_checkpoint", "latest")
               if a != "--use_peft"]
    code, errors, _ = cli(capsys, *no_peft)
    assert code == 2
    one_line(errors, "--use_peft false differs from the true that checkpoint-2 was trained with")


def test_a_folder_that_is_not_a_checkpoint_is_refused(tiny_llama, tmp_path, data, capsys):
    code, errors, _ = cli(capsys, *args(tiny_llama, data, tmp_path / "out", "--max_steps", "2",
                                        "--resume_from_checkpoint", tiny_llama))
    assert code == 2
    one_line(errors, f"--resume_from_checkpoint {tiny_llama}: not a complete Trainer checkpoint")
