"""The README and the shipped example config stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from functionalnetworkssft.options import build_parser, parse
from functionalnetworkssft.training.config import TrainConfig
from functionalnetworkssft.export.command import ExportConfig
from functionalnetworkssft.generate import GenerateConfig
from functionalnetworkssft.hub.command import PushConfig
from functionalnetworkssft.merge import MergeConfig
from functionalnetworkssft.networks.command import TemplatesConfig

ROOT = Path(__file__).resolve().parents[1]
# Flags the README quotes that are not fnsft's: pip's index URL, the benchmark scripts' output file, and the
# launchers' own (accelerate's config file, torchrun's process count).
FOREIGN_FLAGS = {"--index-url", "--config_file", "--nproc_per_node"}


def known_flags() -> set[str]:
    flags = {"--help"}
    for script in (ROOT / "benchmarks").glob("*.py"):  # the benchmarks' own flags, as their argparse declares them
        flags.update(re.findall(r"add_argument\(\"(--[a-z][\w-]*)\"", script.read_text()))
    for cls in (TrainConfig, MergeConfig, PushConfig, GenerateConfig, TemplatesConfig, ExportConfig):
        for action in build_parser(cls, "fnsft")._actions:
            flags.update(action.option_strings)
    return flags


def test_every_flag_the_readme_mentions_exists():
    text = (ROOT / "README.md").read_text()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9]+)*", text)) - FOREIGN_FLAGS
    assert mentioned, "the README mentions no flags?"
    assert sorted(mentioned - known_flags()) == []


def test_readme_setup_is_the_two_make_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == ["make quickstart", "make test"]


def test_quickstart_config_is_a_valid_train_config():
    cfg = parse(TrainConfig, ["--config", str(ROOT / "examples" / "quickstart.yaml")], "fnsft train")
    assert cfg.use_peft and cfg.merge_adapter_with_base and cfg.sample_prompts
    assert all((ROOT / source).is_file() for source in cfg.dataset_name_or_path)
