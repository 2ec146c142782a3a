"""The user's files are never lost: only what a run recorded is replaced, inputs are never touched, one writer per
folder (a killed one never leaves it locked), and a run that fails before training leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from hostile import cli, error_lines, listing, no_traceback, one_line, train_with_callback


def train_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", out,
            "--max_steps", "1", "--validation_split", "0", *extra]


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write in, root included (root ignores permission bits, not the immutable flag)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_overwrite_refuses_to_touch_files_no_run_recorded_or_the_dataset(tiny_llama, tmp_path, capsys):
    userdir = tmp_path / "userdir"
    data = write_jsonl(userdir / "samples.json", TOY[:8])
    for name in ("runs", "adapter", "checkpoint-best"):
        (userdir / name).mkdir()
        (userdir / name / "mine.txt").write_text("mine")
    before = {p: p.read_bytes() for p in userdir.rglob("*") if p.is_file()}
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, userdir, "--use_peft", "--overwrite_output_dir",
                                              "--sample_prompts", "Hi"))
    assert code == 2
    assert len(errors) == 2, errors
    assert "holds adapter/, checkpoint-best/, samples.json, which no fnsft run recorded" in errors[0]
    assert f"--dataset_name_or_path {data} lies inside {data}, which this run would replace" in errors[1]
    assert {p: p.read_bytes() for p in userdir.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_exactly_what_the_earlier_run_recorded(tiny_gpt2, tmp_path, capsys):
    userdir = tmp_path / "userdir"
    data = write_jsonl(userdir / "samples.json", TOY[:8])
    (userdir / "runs").mkdir()
    (userdir / "runs" / "mine.txt").write_text("mine")
    args = train_args(tiny_gpt2, data, userdir, "--use_peft", "--save_steps", "1")
    assert cli(capsys, *args)[0] == 0  # the user's files share the folder; none of them has a name the run writes
    manifest = json.loads((userdir / "fnsft_outputs.json").read_text())
    assert {"final_model", "adapter", "checkpoint-1", "run_config.yaml"} <= set(manifest["entries"])
    assert manifest["status"] == "complete"
    assert "samples.json" not in manifest["entries"] and "runs" not in manifest["entries"]
    (userdir / "final_model" / "stale.txt").write_text("from the first run")

    code, errors, _ = cli(capsys, *args)  # an earlier run is protected without the flag
    assert code == 2
    one_line(errors, "holds an earlier run (adapter, checkpoint-1, final_model)")
    assert cli(capsys, *args, "--overwrite_output_dir")[0] == 0
    assert not (userdir / "final_model" / "stale.txt").exists()
    assert (userdir / "runs" / "mine.txt").read_text() == "mine"
    assert json.loads(data.read_text().splitlines()[0]) == TOY[0]


def test_an_input_inside_what_the_run_replaces_is_refused(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    assert cli(capsys, *train_args(tiny_llama, data, out))[0] == 0  # full fine-tuning: final_model/ is a model
    before = listing(out)
    shutil.copy(data, out / "final_model" / "more.jsonl")
    config = out / "checkpoint-1" / "again.yaml"
    config.write_text("lora_r: 4\n")
    for flag, value in (("--model_name_or_path", out / "final_model"),
                        ("--dataset_name_or_path", out / "final_model" / "more.jsonl")):
        args = train_args(tiny_llama, data, out, "--overwrite_output_dir")
        args[args.index(flag) + 1] = value
        code, errors, _ = cli(capsys, *args)
        assert code == 2
        one_line(errors, f"{flag} {value} lies inside {out / 'final_model'}, which this run would replace")
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out, "--overwrite_output_dir", "--config", config))
    assert code == 2
    one_line(errors, f"--config {config} lies inside {out / 'checkpoint-1'}")
    assert listing(out) == sorted(before + ["checkpoint-1/again.yaml", "final_model/more.jsonl"])


def test_a_run_that_fails_before_training_leaves_nothing_and_the_rerun_is_not_refused(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out, "--use_peft", "--lora_target_modules",
                                              "q_proj", "no_such_proj"))
    assert code == 2
    one_line(errors, "--lora_target_modules: no_such_proj matches no layer", "o_proj, q_proj, up_proj, v_proj")
    assert not out.exists()

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out.mkdir()  # an existing empty folder stays exactly as it was
    code, errors, _ = cli(capsys, *train_args(broken, data, out, "--use_peft"))
    assert code == 1
    one_line(errors, f"--model_name_or_path {broken}: model.safetensors:", "truncated")
    assert listing(out) == []

    assert cli(capsys, *train_args(tiny_llama, data, out, "--use_peft"))[0] == 0  # no --overwrite_output_dir needed


def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_rerun(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text("# left by a run killed in its first step\n")
    (out / "fnsft_outputs.json").write_text(json.dumps({"status": "running", "entries": ["run_config.yaml"]}))
    assert cli(capsys, *train_args(tiny_llama, data, out, "--use_peft"))[0] == 0
    assert "left by a run" not in (out / "run_config.yaml").read_text()


def test_a_read_only_output_folder_is_refused_up_front(tiny_llama, tmp_path, capsys, read_only):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    for out in (read_only, read_only / "inside"):
        code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out))
        assert code == 2
        one_line(errors, f"--output_dir {out}: cannot write in {read_only}", "choose a writable folder")
    assert listing(read_only) == []


PAUSE_IN_TRAINING = train_with_callback("""
class Callback(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print("training", flush=True)
        time.sleep(600)
""")


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_run_leaves_it_usable(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    args = train_args(tiny_llama, data, out, "--use_peft", "--save_steps", "5")[1:]
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-c", PAUSE_IN_TRAINING, *map(str, args)], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True)
    try:
        assert any(line.strip() == "training" for line in iter(first.stdout.readline, "")), log.read_text()[-2000:]
        code, errors, _ = cli(capsys, "train", *args, "--overwrite_output_dir")
        assert code == 1
        one_line(errors, f"{out} is being written by fnsft train (pid {first.pid}", "wait for it to finish")
        assert (out / "run_config.yaml").is_file()  # the running run's files are untouched
    finally:
        first.kill()
        first.wait()
    # Killed in its first step: no checkpoint, so nothing to protect; the lock died with the process.
    assert cli(capsys, "train", *args)[0] == 0
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
    assert not (out / ".fnsft.lock").exists()


PAUSE_IN_MERGE = """
import sys, time
from pathlib import Path
import functionalnetworkssft.merge.write as write

real = write.write_shards
def slow(folder, shards, progress=None):
    index = real(folder, shards, progress)
    print(folder, flush=True)
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    return index
write.write_shards = slow

from functionalnetworkssft.merge import merge_adapter
merge_adapter(sys.argv[1], sys.argv[2], verify="off")
print("done", flush=True)
"""


def test_two_merges_into_one_folder_never_delete_each_others_staging(tiny_gpt2, tmp_path, capsys):
    from test_merge import make_adapter

    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    merged, go = tmp_path / "merged", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSE_IN_MERGE, str(adapter), str(merged), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        staging = Path(first.stdout.readline().strip())
        assert staging.is_dir() and staging.name.startswith(".merged.partial-")
        code, errors, _ = cli(capsys, "merge", "--adapter_path", adapter, "--output_dir", merged, "--verify", "off")
        assert code == 1
        one_line(errors, f"{merged} is being written by fnsft merge (pid {first.pid}")
        assert staging.is_dir() and any(staging.iterdir())
        go.touch()
        assert any(line.strip() == "done" for line in iter(first.stdout.readline, ""))
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    assert (merged / "model.safetensors").is_file() and not staging.exists()

    # A merge killed mid-write leaves its staging folder; the next merge clears it (the owner is gone) and succeeds.
    go.unlink()
    killed = subprocess.Popen([sys.executable, "-c", PAUSE_IN_MERGE, str(adapter), str(merged), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    staging = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    assert staging.is_dir()
    assert cli(capsys, "merge", "--adapter_path", adapter, "--output_dir", merged, "--verify", "off")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_a_merge_never_replaces_a_folder_holding_files_it_did_not_write(tiny_gpt2, tmp_path, capsys):
    from test_merge import make_adapter

    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    merged = tmp_path / "merged"
    args = ["merge", "--adapter_path", adapter, "--output_dir", merged, "--verify", "off"]
    assert cli(capsys, *args)[0] == 0
    (merged / "notes.md").write_text("mine")
    code, errors, _ = cli(capsys, *args)
    assert code == 2
    one_line(errors, "also holds notes.md, which the merge did not write and would delete")
    code, errors, _ = cli(capsys, "merge", "--adapter_path", adapter, "--output_dir", adapter)
    assert code == 2
    one_line(errors, f"--output_dir {adapter} overlaps --adapter_path")
    assert (merged / "notes.md").read_text() == "mine"


def test_a_merge_into_a_read_only_folder_is_one_line(tiny_gpt2, tmp_path, read_only, capsys):
    from functionalnetworkssft.cli import main
    from test_merge import make_adapter

    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    capsys.readouterr()
    assert main(["merge", "--adapter_path", str(adapter), "--output_dir", str(read_only / "merged"), "--verify",
                 "off"]) == 1
    stderr = capsys.readouterr().err
    no_traceback(stderr)
    one_line(error_lines(stderr), f"{read_only / 'merged'}: cannot create the lock file")
    assert listing(read_only) == []
