"""Nothing secret or local leaves the machine: the token is looked for in every byte of every file, and no uploaded
file names a local path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TOY, write_jsonl
from functionalnetworkssft import hub
from functionalnetworkssft.errors import FnsftError
from hostile import cli


@pytest.mark.parametrize("where", ["end", "chunk boundary"])
def test_the_token_is_found_in_a_file_of_any_size(hub_server, tiny_llama, tmp_path, where):
    from test_merge import make_adapter

    folder = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    token = hub_server.token.encode()
    size = 70 << 20
    offset = size - len(token) if where == "end" else (8 << 20) - len(token) // 2
    with open(folder / "train.log", "wb") as handle:
        handle.truncate(size)
        handle.seek(offset)
        handle.write(token)
    with pytest.raises(FnsftError, match="train.log contains the Hub token; refusing to upload it"):
        hub.push_folder(folder, "alice/big-log", token=hub_server.token)
    assert hub_server.calls("commit") == [] and hub_server.repo("alice/big-log") is None


def test_no_uploaded_file_names_a_local_path(hub_server, tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    data = write_jsonl(tmp_path / "data" / "toy.jsonl", TOY[:8])
    out = tmp_path / "out"
    code, _, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                     "--output_dir", out, "--use_peft", "--max_steps", "1", "--validation_split", "0",
                     "--merge_adapter_with_base", "--push_to_hub", "--hub_repo_id", "alice/no-paths")
    assert code == 0
    for folder, repo in ((out / "final_model", "alice/no-paths"), (out / "merged_model", "alice/no-paths-merged")):
        if repo != "alice/no-paths":
            assert hub.push_folder(folder, repo, token=hub_server.token)
        files = hub_server.files(repo)
        for name, content in files.items():
            for local in (str(tmp_path), str(tiny_llama), os.path.expanduser("~") + "/", "data/toy.jsonl"):
                assert local.encode() not in content, (repo, name, local)
        assert Path(folder / "adapter_config.json").exists() == ("adapter_config.json" in files)
    local_record = json.loads((out / "final_model" / "fnsft_training.json").read_text())
    assert local_record["base_model_path"] == str(tiny_llama)  # the local files keep their paths
    public = json.loads(hub_server.files("alice/no-paths")["fnsft_training.json"])
    assert {"base_model", "base_model_path", "dataset"}.isdisjoint(public) and public["method"] == "lora"
    assert "base_model_name_or_path" not in json.loads(hub_server.files("alice/no-paths")["adapter_config.json"])
    report = json.loads(hub_server.files("alice/no-paths-merged")["merge_report.json"])
    assert {"base_model", "adapter_path", "output_dir"}.isdisjoint(report) and report["verification"]["status"]


def test_the_left_out_fields_are_named_in_one_line(hub_server, tiny_llama, tmp_path, caplog):
    import logging

    from test_merge import make_adapter

    folder = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    ours = logging.getLogger("functionalnetworkssft")
    ours.addHandler(caplog.handler)
    try:
        hub.push_folder(folder, "alice/said", token=hub_server.token)
    finally:
        ours.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "Left out of the upload" in r.getMessage()]
    assert lines == ["Left out of the upload, being local paths (the base model's Hub id is not known): "
                     "adapter_config.json base_model_name_or_path."]


def test_a_hub_id_recorded_for_the_base_replaces_its_local_path(hub_server, tiny_llama, tmp_path):
    from test_merge import make_adapter

    folder = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    (folder / "fnsft_training.json").write_text(json.dumps({"base_model": "pkg:some_pkg/model.gguf",
                                                            "base_model_hub_id": "SomeOrg/Some-Model-1.5B"}))
    hub.push_folder(folder, "alice/with-id", token=hub_server.token)
    files = hub_server.files("alice/with-id")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "SomeOrg/Some-Model-1.5B"
    assert json.loads(files["fnsft_training.json"]) == {"base_model": "SomeOrg/Some-Model-1.5B",
                                                         "base_model_hub_id": "SomeOrg/Some-Model-1.5B"}
    assert b"base_model: SomeOrg/Some-Model-1.5B" in files["README.md"]


def test_a_gguf_that_names_its_source_repository_gives_the_hub_id(tmp_path):
    import gguf

    from functionalnetworkssft.modeling import gguf_hub_id

    def write(path: Path, **fields: str) -> Path:
        writer = gguf.GGUFWriter(str(path), "llama")
        for key, value in fields.items():
            writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path

    assert gguf_hub_id(write(tmp_path / "a.gguf", **{
        "general.source.url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"})) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert gguf_hub_id(write(tmp_path / "b.gguf", **{"general.name": "Smollm2 135M"})) is None
    (tmp_path / "c.gguf").write_bytes(b"not a gguf")
    assert gguf_hub_id(tmp_path / "c.gguf") is None


def test_a_link_to_a_file_outside_the_folder_is_never_uploaded(hub_server, tiny_llama, tmp_path):
    from test_merge import make_adapter

    folder = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    secret = tmp_path / "secret.txt"
    secret.write_text("private notes")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(FnsftError, match="is a link to .*secret.txt, outside .*; refusing to upload"):
        hub.push_folder(folder, "alice/linked", token=hub_server.token)
    assert hub_server.calls("commit") == [] and hub_server.repo("alice/linked") is None
