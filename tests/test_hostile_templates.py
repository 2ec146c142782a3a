"""A chat template is code: one that loops without end, writes without end or reaches past the sandbox stops
training, generate, chat and export in one line naming it, in real processes with timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from hostile import cli, error_lines, no_traceback, one_line, run_fnsft

ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
HUGE = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
# The render budget shortened for the test: the same code path as the default's 10 s, sooner.
QUICK = ("import sys\nimport functionalnetworkssft.chat_rendering as rendering\nrendering.SECONDS = 2\n"
         "from functionalnetworkssft.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def with_template(base: Path, folder: Path, template: str) -> Path:
    shutil.copytree(base, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_an_endless_template_given_to_training_stops_it_in_one_line_naming_the_file(tiny_llama, tmp_path):
    template = tmp_path / "endless.jinja"
    template.write_text(ENDLESS)
    data = write_jsonl(tmp_path / "data.jsonl", TOY[:4])
    result = run_fnsft("train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir",
                       tmp_path / "out", "--max_steps", "1", "--chat_template_path", template, code=QUICK, timeout=120)
    assert result.returncode == 1
    no_traceback(result.stderr)
    one_line(error_lines(result.stderr), f"--chat_template_path {template} did not finish rendering",
             "may loop without end")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_endless_template_in_the_model_stops_generate_and_chat_in_one_line(command, tiny_llama, tmp_path):
    model = with_template(tiny_llama, tmp_path / "model", ENDLESS)
    argv = [command, model] + (["--prompt", "Hi"] if command == "generate" else [])
    result = run_with_stdin(argv, b"Hi\n")
    assert result.returncode == 1
    no_traceback(result.stderr)
    one_line(error_lines(result.stderr), f"the chat template of {model} did not finish rendering")


def run_with_stdin(argv, stdin: bytes) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", QUICK, *[str(a) for a in argv]], input=stdin, capture_output=True,
                          timeout=120, env=os.environ.copy())
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def test_a_template_that_writes_without_end_is_one_line(tiny_llama, tmp_path, capsys):
    model = with_template(tiny_llama, tmp_path / "model", HUGE)
    code, errors, _ = cli(capsys, "generate", model, "--prompt", "Hi")
    assert code == 1
    one_line(errors, f"the chat template of {model} rendered one conversation as 10,000,000 characters")


@pytest.mark.parametrize("command", ["export-gguf", "generate"])
def test_a_template_that_reaches_past_the_sandbox_is_one_line_and_runs_nothing(command, tiny_llama, tmp_path,
                                                                               capsys):
    model = with_template(tiny_llama, tmp_path / "model", ESCAPE)
    argv = [command, model] + (["--outfile", tmp_path / "model.gguf"] if command == "export-gguf"
                               else ["--prompt", "Hi"])
    code, errors, _ = cli(capsys, *argv)
    assert code == 1
    one_line(errors, f"the chat template of {model} tries something the template sandbox forbids")
    assert not (tmp_path / "model.gguf").exists()
