"""Data-parallel training with torchrun on CPU (gloo): the data is split, one process owns the outputs and speaks,
and a rank that dies ends the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from hostile import train_with_callback

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "torchrun fnsft_trainer": TORCHRUN + ["-m", "functionalnetworkssft.fnsft_trainer"],
    "torchrun functionalnetworkssft train": TORCHRUN + ["-m", "functionalnetworkssft", "train"],
    "accelerate launch": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "-m",
                          "functionalnetworkssft.fnsft_trainer"],
}


def run(args: list, env: dict | None = None, module: list | None = None,
        launcher: str = "torchrun fnsft_trainer") -> subprocess.CompletedProcess:
    command = (TORCHRUN + module if module else LAUNCHERS[launcher]) + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_split_the_data_and_write_one_set_of_outputs(tiny_llama, tmp_path, launcher):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:16])
    out = tmp_path / "out"
    result = run(["--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir", out,
                  "--use_peft", "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--validation_split",
                  "0", "--merge_adapter_with_base", "--sample_prompts", "Tell me about item 3.", "--save_steps", "2"],
                 launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    # 16 examples, 2 per step on each of 2 processes: 4 steps (one process alone takes 8).
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    for line in ("Data: 16 training", "Training done: 4 steps", "Prompt: Tell me about item 3.", "merged "):
        assert result.stdout.count(line) == 1, (line, result.stdout[-2000:])
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower()
    report = json.loads((out / "merged_model" / "merge_report.json").read_text())
    assert report["verification"]["status"] == "passed"
    manifest = json.loads((out / "fnsft_outputs.json").read_text())
    assert manifest["status"] == "complete" and "checkpoint-4" in manifest["entries"]
    assert (out / "checkpoint-4" / "fnsft_checkpoint.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-2", "checkpoint-4", "final_model",
                                                     "fnsft_outputs.json", "loss.png", "merged_model",
                                                     "run_config.yaml", "samples.json", "trainer_state.json"]


KILL_RANK_1 = train_with_callback("""
class Callback(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ.get("RANK") == "1" and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_rank_that_dies_ends_the_run_with_a_failure(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:32])
    out = tmp_path / "out"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    result = run(["--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir", out,
                  "--use_peft", "--max_steps", "50", "--per_device_train_batch_size", "2", "--validation_split", "0"],
                 module=[str(script)])
    assert result.returncode != 0
    assert not (out / "final_model").exists()
    shutil.rmtree(out, ignore_errors=True)


SLOW_MAIN = """
import os, sys, time
if os.environ.get("RANK") == "0":
    time.sleep(4)  # the main process is the slow one (a busy machine, a cold disk)
from functionalnetworkssft.fnsft_trainer import main
raise SystemExit(main())
"""


def test_a_flag_error_is_printed_once_by_the_main_process_even_when_it_is_the_slow_one(tmp_path):
    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_MAIN)
    result = run(["--model_name_or_path", "./none", "--dataset_name_or_path", tmp_path / "d.jsonl", "--output_dir",
                  tmp_path / "out", "--lora_r", "0"], module=[str(script)])
    assert result.returncode != 0
    # Said once, by the main process: not lost when a replica fails first, not repeated by the replicas.
    assert result.stderr.count("fnsft train: error: --lora_r must be positive (got 0)") == 1, result.stderr[-2000:]
    assert "(rank 1)" not in result.stderr
    assert not (tmp_path / "out").exists()
