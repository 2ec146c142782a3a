"""Never write outside the output folder, never through a link: lock files, resumed entries, forged records and
inputs inside outputs, each tried with what an attacker (or an accident) can plant in the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from hostile import cli, one_line


def train_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", out,
            "--max_steps", "1", "--validation_split", "0", *extra]


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every folder fnsft is given, which nothing may change."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def tiny_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("planted", ["symlink", "hardlink"])
def test_a_planted_train_lock_file_is_refused_and_its_target_untouched(planted, tiny_llama, tmp_path, victim,
                                                                       capsys):
    out = tmp_path / "out"
    out.mkdir()
    if planted == "symlink":
        (out / ".fnsft.lock").symlink_to(victim)
    else:
        os.link(victim, out / ".fnsft.lock")
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out))
    assert code == 1
    one_line(errors, ".fnsft.lock", "link" if planted == "symlink" else "not a plain file")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == [".fnsft.lock"]


def test_a_planted_merge_lock_link_is_refused_and_its_target_untouched(tiny_llama, tmp_path, victim, capsys):
    adapter = tiny_adapter(tiny_llama, tmp_path / "adapter")
    (tmp_path / ".merged.fnsft.lock").symlink_to(victim)
    code, errors, _ = cli(capsys, "merge", "--adapter_path", adapter, "--base_model_name_or_path", tiny_llama,
                          "--output_dir", tmp_path / "merged")
    assert code == 1
    one_line(errors, ".merged.fnsft.lock", "link")
    assert victim.read_text() == "precious" and not (tmp_path / "merged").exists()


def test_a_planted_export_lock_link_is_refused_and_its_target_untouched(tiny_llama, tmp_path, victim, capsys):
    (tmp_path / ".model.gguf.fnsft.lock").symlink_to(victim)
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "model.gguf")
    assert code == 1
    one_line(errors, ".model.gguf.fnsft.lock", "link")
    assert victim.read_text() == "precious" and not (tmp_path / "model.gguf").exists()


def test_a_forged_manifest_makes_nothing_removable(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "notes.txt").write_text("mine")
    (out / "fnsft_outputs.json").write_text(json.dumps({"status": "complete",
                                                        "entries": ["notes.txt", ".git", "final_model"]}))
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out, "--overwrite_output_dir"))
    assert code == 2
    one_line(errors, "fnsft_outputs.json names .git, notes.txt", "fnsft never writes")
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").is_file()


def test_resuming_replaces_planted_links_instead_of_writing_through_them(tiny_llama, tmp_path, victim, capsys):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:8])
    args = train_args(tiny_llama, data, out, "--use_peft", "--save_steps", "1")
    assert cli(capsys, *args)[0] == 0
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_text("precious weights")
    for name, target in (("run_config.yaml", victim), ("final_model", outside)):
        path = out / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        path.symlink_to(target)
    code, _, _ = cli(capsys, *args[:args.index("--max_steps") + 1], "2", *args[args.index("--max_steps") + 2:],
                     "--resume_from_checkpoint", "latest")
    assert code == 0
    assert victim.read_text() == "precious"
    assert (outside / "adapter_model.safetensors").read_text() == "precious weights"
    assert not (out / "run_config.yaml").is_symlink() and not (out / "final_model").is_symlink()
    assert (out / "final_model" / "adapter_model.safetensors").stat().st_size > 100


def test_overwriting_never_deletes_the_template_file_the_run_was_given(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    template = out / "global_templates.json"
    template.write_text("{}")
    (out / "fnsft_outputs.json").write_text(json.dumps({"status": "complete", "entries": ["global_templates.json"]}))
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    code, errors, _ = cli(capsys, *train_args(tiny_llama, data, out, "--use_peft", "--overwrite_output_dir",
                                              "--mask_mode", "lesion", "--ica_template_path", template))
    assert code == 2
    assert any(f"--ica_template_path {template} lies inside {template}" in line for line in errors), errors
    assert template.read_text() == "{}"


def test_templates_never_overwrite_their_dataset_or_a_plot_they_did_not_make(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:8])
    before = data.read_bytes()
    code, errors, _ = cli(capsys, "templates", tiny_llama, data, "--ica_components", "2", "--output", data)
    assert code == 2 and data.read_bytes() == before
    assert any(f"--datasets {data} lies inside {data}" in line for line in errors), errors
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "coverage.png").write_bytes(b"my own plot")
    code, errors, _ = cli(capsys, "templates", tiny_llama, data, "--ica_components", "2", "--output",
                          mine / "net.json")
    assert code == 2
    one_line(errors, f"{mine / 'coverage.png'} exists beside it")
    assert (mine / "coverage.png").read_bytes() == b"my own plot" and not (mine / "net.json").exists()


def test_templates_replace_their_own_earlier_output_and_plot_but_never_a_link(tiny_llama, tmp_path, victim,
                                                                             capsys):
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:8])
    out = tmp_path / "net.json"
    args = ["templates", tiny_llama, data, "--ica_components", "2", "--samples_per_dataset", "8", "--output", out]
    assert cli(capsys, *args)[0] == 0
    first = (tmp_path / "coverage.png").read_bytes()
    assert cli(capsys, *args, "--seed", "1")[0] == 0  # its own template and plot: replaced
    assert json.loads(out.read_text())["provenance"] and (tmp_path / "coverage.png").read_bytes()[:8] == first[:8]
    (tmp_path / "coverage.png").unlink()
    (tmp_path / "coverage.png").symlink_to(victim)  # a link planted where the plot goes
    code, errors, _ = cli(capsys, *args)
    assert code == 2
    one_line(errors, "coverage.png exists beside it and is not a plot fnsft made")
    assert victim.read_text() == "precious" and (tmp_path / "coverage.png").is_symlink()


class _Payload:
    """What an attacker saves in a checkpoint's torch archive: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("archive", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_archive_that_would_run_code_is_refused_before_anything_loads(archive, tiny_llama, tmp_path,
                                                                                    capsys):
    import torch

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:8])
    args = train_args(tiny_llama, data, out, "--use_peft", "--save_steps", "1")
    assert cli(capsys, *args)[0] == 0
    marker = tmp_path / "pwned"
    target = out / "checkpoint-1" / archive
    torch.save({"state": _Payload(marker)}, target)
    stamp = out / "checkpoint-1" / "fnsft_checkpoint.json"  # an attacker rewrites the record of sizes too
    record = json.loads(stamp.read_text())
    record["files"][archive] = target.stat().st_size
    stamp.write_text(json.dumps(record))
    code, errors, printed = cli(capsys, *args, "--resume_from_checkpoint", "latest")
    assert code == 2
    one_line(errors, f"checkpoint-1/{archive} is not plain saved state")
    assert not marker.exists() and "Data:" not in printed


def test_resuming_from_the_last_checkpoint_trains_nothing_and_goes_on_to_the_merge(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:8])
    args = [*train_args(tiny_llama, data, out, "--use_peft", "--save_steps", "1")]
    args[args.index("--max_steps") + 1] = "2"
    assert cli(capsys, *args)[0] == 0
    last = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    code, errors, printed = cli(capsys, *args, "--merge_adapter_with_base", "--resume_from_checkpoint", "latest")
    assert code == 0, errors
    assert "Nothing left to train: checkpoint-2 is the run's last step (2)." in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    final = load_file(out / "final_model" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all((final[k] == last[k]).all() for k in final)
    assert (out / "merged_model" / "config.json").is_file()
