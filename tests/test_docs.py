"""The README, the documentation pages under docs/ and the shipped example config stay true to the code, and the
documentation site builds in strict mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from functionalnetworkssft.options import build_parser, parse
from functionalnetworkssft.training.config import TrainConfig
from functionalnetworkssft.cli import USAGE
from functionalnetworkssft.export.command import ExportConfig
from functionalnetworkssft.generate import GenerateConfig
from functionalnetworkssft.hub.command import PushConfig
from functionalnetworkssft.merge import MergeConfig
from functionalnetworkssft.networks.command import TemplatesConfig

ROOT = Path(__file__).resolve().parents[1]
# The README and every page of the documentation site.
DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
# The top-level command's own flags (`fnsft --help`, `fnsft --version`), as its usage text declares them.
TOP_LEVEL_FLAGS = set(re.findall(r"--[a-z][a-z-]*", USAGE))
# Flags the README and the docs quote that are not fnsft's: pip's index URL, the benchmark scripts' output file, and
# the launchers' own (accelerate's config file, torchrun's process count).
FOREIGN_FLAGS = {"--index-url", "--config_file", "--nproc_per_node"}


def known_flags() -> set[str]:
    flags = set(TOP_LEVEL_FLAGS)
    for script in (ROOT / "benchmarks").glob("*.py"):  # the benchmarks' own flags, as their argparse declares them
        flags.update(re.findall(r"add_argument\(\"(--[a-z][\w-]*)\"", script.read_text()))
    for cls in (TrainConfig, MergeConfig, PushConfig, GenerateConfig, TemplatesConfig, ExportConfig):
        for action in build_parser(cls, "fnsft")._actions:
            flags.update(action.option_strings)
    return flags


@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_flag_the_readme_mentions_exists(doc):
    text = (ROOT / doc).read_text()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9]+)*", text)) - FOREIGN_FLAGS
    if doc == "README.md":
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


def nav_pages(nav) -> list[str]:
    """The page files of a mkdocs nav, nested sections included (external links left out)."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif value.endswith(".md"):
            pages.append(value)
    return pages


def test_docs_site_builds_strict_with_every_page_in_the_nav(tmp_path):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.rglob("*.md"))
    assert sorted(pages) == on_disk, "every page under docs/ is in the nav of mkdocs.yml, and only those"
    site = tmp_path / "site"
    # Material prints a banner about MkDocs 2.0 on every build; it is not a warning of this site's.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site),
                           "-f", "mkdocs.yml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in pages:
        html = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert html.is_file(), f"{page} produced no {html.relative_to(site)}"


def test_the_readme_family_table_is_the_families_the_tests_run_with_a_test_per_column():
    import families
    import family_tests

    text = (ROOT / "README.md").read_text()
    section = text.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    assert len(rows) == len(families.FAMILIES)
    tests = family_tests.family_tests(["llama3"])
    # Each stage column and the family test that backs it.
    backed_by = ["test_lora_training_merges_into_a_verified_model", "test_full_fine_tuning_saves_a_loadable_model",
                 "test_the_merged_model_exports_to_a_verified_gguf", "test_the_gguf_equals_llama_cpp_converters_file",
                 "test_the_merged_model_replies_through_its_chat_template"]
    assert all(name in tests for name in backed_by)
    import transformers

    for row, family in zip(rows, families.FAMILIES):
        config = getattr(transformers, family.config_class)()
        assert row[1] == f"`{config.model_type}`", row
        assert row[2] == {"bpe": "BPE", "sentencepiece": "SentencePiece"}[family.tokenizer], row
        assert row[3:] == ["✓"] * len(backed_by), row
