"""Hub upload over real HTTP: the real huggingface_hub client against the test Hub server (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hub_server import Account

from functionalnetworkssft import hub
from functionalnetworkssft.hub import command as hub_command
from functionalnetworkssft.cli import run_guarded
from functionalnetworkssft.errors import FnsftError, UsageError

FNSFT = str(Path(sys.executable).with_name("fnsft"))
BASE_ID = "acme/tiny-llama-base"
DATASET_ID = "acme/chat-conversations"
BASE_CARD = b"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# A tiny base\n"


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA run's outputs as `fnsft train --merge_adapter_with_base` leaves them.

    final_model/ and adapter/ (the adapter and its training record), merged_model/ (weights, merge report).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("run") / "output"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    # Random (non-zero) B: the merged model differs from the base, so a wrong upload would show in the logits.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    record = {"base_model": BASE_ID, "base_model_path": str(tiny_llama), "dataset": DATASET_ID, "method": "lora",
              "hyperparameters": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 0.0002, "num_train_epochs": 1.0,
                                  "resume_from_checkpoint": str(out / "checkpoint-5")}}
    final = out / "final_model"
    peft_model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "fnsft_training.json").write_text(json.dumps(record))
    shutil.copytree(final, out / "adapter")
    merged = out / "merged_model"
    peft_model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    (merged / "fnsft_training.json").write_text(json.dumps(record))
    (merged / "merge_report.json").write_text(json.dumps({
        "output_dir": str(merged), "base_model": str(tiny_llama), "adapter_path": str(final), "dtype": "float32",
        "lora_modules": 4, "variants": ["lora"], "shards": 1,
        "replaced_tensors": [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)],
        "inputs": {"base_files": {"model.safetensors": "ab" * 32}, "adapter_files": {}},
        "verification": {"status": "passed", "max_abs_logit_diff": 3.1e-07, "tolerance": 0.0001,
                         "top1_agreement": 1.0, "greedy_equal": True, "probes": ["cd" * 32] * 3}}))
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def card(readme: bytes) -> tuple[dict, str]:
    text = readme.decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def seed_base(server) -> None:
    server.create_repo(BASE_ID, files={"README.md": BASE_CARD})


# ---- uploads ---------------------------------------------------------------------------------------------------------
def test_adapter_upload_creates_a_private_repo_with_the_files_and_a_card(hub_server, run_dir, tiny_llama):
    seed_base(hub_server)
    final = run_dir / "final_model"
    before = snapshot(final)

    url = hub.push_folder(final, "alice/tiny-adapter", token=hub_server.token)

    assert url.startswith(f"{hub_server.url}/alice/tiny-adapter/commit/")
    assert hub_server.repo("alice/tiny-adapter")["private"] is True
    remote = hub_server.files("alice/tiny-adapter")
    for rel, path in ((p.relative_to(final).as_posix(), p) for p in final.iterdir()):
        if rel in ("adapter_config.json", "fnsft_training.json"):
            # Records carry local paths: uploaded as public copies, the base named by its Hub id, the rest unchanged.
            local, public = json.loads(path.read_text()), json.loads(remote[rel])
            assert str(run_dir.parent) not in remote[rel].decode() and str(tiny_llama) not in remote[rel].decode()
            changed = {k for k in local if public.get(k) != local[k]}
            assert changed <= {"base_model_name_or_path", "base_model_path", "hyperparameters"}, changed
        elif rel != "README.md":  # PEFT's template card is replaced by ours
            assert remote[rel] == path.read_bytes(), rel
    assert json.loads(remote["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    assert json.loads(remote["fnsft_training.json"])["base_model_path"] == BASE_ID
    meta, body = card(remote["README.md"])
    assert meta["base_model"] == BASE_ID
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == [DATASET_ID]
    assert meta["license"] == "apache-2.0"  # read from the base model's card on the Hub
    assert {"peft", "lora", "fnsft", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    assert "| lora_r | 4 |" in body and "| learning_rate | 0.0002 |" in body
    assert "| resume_from_checkpoint | checkpoint-5 |" in body  # a local path is cut to its last component
    assert str(run_dir.parent) not in remote["README.md"].decode()
    assert "AutoPeftModelForCausalLM.from_pretrained(\"alice/tiny-adapter\")" in body
    # Weights went through Git LFS (the server offers no Xet); small JSON went inline in the commit.
    assert hub_server.calls("xet-token") == [404]
    assert hub_server.calls("lfs-upload") == [200]
    assert hub_server.calls("commit") == [200]
    assert hub_server.commits("alice/tiny-adapter")[0]["summary"] == "Upload LoRA adapter with fnsft"
    assert snapshot(final) == before


def test_merged_model_upload_loads_back_with_from_pretrained(hub_server, run_dir, monkeypatch):
    merged = run_dir / "merged_model"
    hub.push_folder(merged, "alice/tiny-merged", token=hub_server.token)

    remote = hub_server.files("alice/tiny-merged")
    assert not any(name.startswith("adapter_") for name in remote)
    meta, body = card(remote["README.md"])
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "finetune"
    assert "license" not in meta  # the base is not on this Hub, so its license is unknown and left out
    assert "## Merge verification" in body
    assert "| max_abs_logit_diff | 3.1e-07 |" in body and "| top1_agreement | 1.0 |" in body
    assert "| greedy_equal | True |" in body and "| dtype | float32 |" in body
    assert "| status | passed |" in body and "| shards | 1 |" in body and "| variants | lora |" in body
    assert "self_attn" not in body and "ab" * 32 not in body and "cd" * 32 not in body  # detail stays in the file
    assert str(run_dir.parent) not in body

    import torch
    from transformers import AutoModelForCausalLM

    hub_server.activate(monkeypatch)  # this process's huggingface_hub, pointed at the server
    remote = AutoModelForCausalLM.from_pretrained("alice/tiny-merged", token=hub_server.token)
    local = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        assert (remote(ids).logits - local(ids).logits).abs().max().item() < 1e-6
    assert 200 in hub_server.calls("resolve")  # the weights really came from the server


def test_existing_repo_keeps_its_visibility_and_branch_and_message_are_honoured(hub_server, run_dir):
    hub_server.create_repo("alice/public-model", private=False)

    url = hub.push_folder(run_dir / "adapter", "alice/public-model", token=hub_server.token, private=True,
                          revision="exp-1", commit_message="first try")

    repo = hub_server.repo("alice/public-model")
    assert repo["private"] is False
    assert url.endswith(repo["branches"]["exp-1"])
    assert set(hub_server.files("alice/public-model", "main")) == {".gitattributes"}
    assert "adapter_model.safetensors" in hub_server.files("alice/public-model", "exp-1")
    assert hub_server.commits("alice/public-model", "exp-1")[0]["summary"] == "first try"


def test_uploading_a_merged_model_over_an_adapter_removes_the_adapter_files(hub_server, run_dir):
    hub.push_folder(run_dir / "adapter", "alice/switch", token=hub_server.token)
    hub.push_folder(run_dir / "merged_model", "alice/switch", token=hub_server.token)

    remote = hub_server.files("alice/switch")
    assert "config.json" in remote and "model.safetensors" in remote and "tokenizer.json" in remote
    # Left behind, adapter_config.json would make from_pretrained load the adapter instead of the merged model.
    assert "adapter_config.json" not in remote and "adapter_model.safetensors" not in remote


def test_card_for_a_local_base_and_local_dataset_names_no_paths(hub_server, run_dir, tmp_path):
    folder = tmp_path / "final_model"
    shutil.copytree(run_dir / "final_model", folder)
    record = json.loads((folder / "fnsft_training.json").read_text())
    record.update(base_model=str(tmp_path / "models" / "my-base"), dataset=str(tmp_path / "data" / "chat.jsonl"))
    (folder / "fnsft_training.json").write_text(json.dumps(record))

    hub.push_folder(folder, "alice/local-bits", token=hub_server.token)

    readme = hub_server.files("alice/local-bits")["README.md"].decode()
    meta, body = card(readme.encode())
    assert "base_model" not in meta and "datasets" not in meta
    assert "a local model (`my-base`)" in body and "a local dataset (`chat.jsonl`)" in body
    assert str(tmp_path) not in readme


def test_merged_card_takes_the_base_from_the_runs_training_record_beside_it(hub_server, run_dir, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(run_dir, out)
    (out / "merged_model" / "fnsft_training.json").unlink()  # the merge report alone names only a local path

    hub.push_folder(out / "merged_model", "alice/beside", token=hub_server.token)

    meta, _ = card(hub_server.files("alice/beside")["README.md"])
    assert meta["base_model"] == BASE_ID and meta["datasets"] == [DATASET_ID]


# ---- checks before training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo_id, expected", [
    ("no-namespace", "exactly one '/'"),
    ("alice/a/b", "exactly one '/'"),
    ("alice/bad--name", "not a valid Hub name"),
    ("alice/-dash", "not a valid Hub name"),
    ("alice/model.git", "cannot end with '.git'"),
])
def test_preflight_rejects_a_malformed_repo_id_without_a_request(hub_server, repo_id, expected):
    with pytest.raises(UsageError, match=expected) as info:
        hub.preflight(repo_id, hub_server.token)
    assert info.value.exit_code == 2
    assert hub_server.requests == []


def test_preflight_rejects_a_malformed_branch_without_a_request(hub_server):
    with pytest.raises(UsageError, match="--hub_revision 'my branch': not a valid branch name"):
        hub.preflight("alice/x", hub_server.token, revision="my branch")
    assert hub_server.requests == []


def test_preflight_without_a_token_fails_in_seconds_with_every_problem(hub_server):
    token = hub.resolve_token(None)  # no HF_TOKEN, no --hub_token, no cached login in this HF_HOME
    assert token is None
    start = time.monotonic()
    with pytest.raises(UsageError) as info:
        hub.preflight("no-namespace", token)
    assert time.monotonic() - start < 5
    assert len(info.value.problems) == 2
    assert "exactly one '/'" in info.value.problems[0]
    assert info.value.problems[1].startswith("no Hub token: set HF_TOKEN, pass --hub_token, or run `hf auth login`")


def test_resolve_token_prefers_the_flag_then_hf_token_then_cached_login_as_huggingface_hub_does(hub_server,
                                                                                                 monkeypatch):
    from huggingface_hub import constants, get_token

    Path(constants.HF_TOKEN_PATH).write_text("hf_cached_login\n")
    assert hub.resolve_token(None) == "hf_cached_login"
    assert hub.resolve_token("hf_from_flag") == "hf_from_flag"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub.resolve_token(None) == "hf_from_env" == get_token()
    assert hub.resolve_token("hf_from_flag") == "hf_from_flag"  # an explicit token wins, as in HfApi(token=...)


def _fine_grained(namespace: str, permissions: list[str]) -> dict:
    return {"scoped": [{"entity": {"type": "user", "name": namespace}, "permissions": permissions}], "global": []}


@pytest.mark.parametrize("who, repo_id, expected", [
    ("unknown", "alice/x", "rejected the token from --hub_token (401 Unauthorized)"),
    ("reader", "bob/x", "is read-only"),
    ("alice", "someone-else/x", "alice cannot create repos under 'someone-else'"),
    ("alice", "viewers/x", "only the read role in organization 'viewers'"),
    ("fine-read", "carol/x", "no 'repo.write' permission for 'carol'"),
    ("alice", "alice/x", None),
    ("alice", "acme/x", None),
    ("fine-write", "carol/x", None),
])
def test_preflight_checks_the_token_can_write_the_repo(hub_server, who, repo_id, expected):
    hub_server.add_account("hf_canary_fine_read", Account("carol", "fineGrained",
                                                          fine_grained=_fine_grained("carol", ["repo.content.read"])))
    hub_server.add_account("hf_canary_fine_write", Account("carol", "fineGrained",
                                                           fine_grained=_fine_grained("carol", ["repo.write"])))
    token = {"alice": hub_server.token, "reader": hub_server.read_token, "unknown": "hf_canary_not_a_token",
             "fine-read": "hf_canary_fine_read", "fine-write": "hf_canary_fine_write"}[who]
    if expected is None:
        hub.preflight(repo_id, token)
        return
    with pytest.raises(UsageError) as info:
        hub.preflight(repo_id, token)
    assert len(info.value.problems) == 1 and expected in info.value.problems[0]
    assert token not in str(info.value)


def test_preflight_with_an_unreachable_hub_fails_fast(hub_server):
    hub_server.stop()
    start = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach the Hub at http://127.0.0.1"):
        hub.preflight("alice/x", hub_server.token)
    assert time.monotonic() - start < 5


def test_preflight_refuses_offline_mode(hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        hub.preflight("alice/x", hub_server.token)


# ---- failures during the upload --------------------------------------------------------------------------------------
def test_transient_server_errors_are_retried_until_the_upload_succeeds(hub_server, run_dir):
    hub_server.fail("create", times=1, status=503)
    hub_server.fail("commit", times=2, status=500)

    hub.push_folder(run_dir / "adapter", "alice/flaky", token=hub_server.token)

    assert hub_server.calls("create") == [503, 200, 409, 409]  # later attempts find the repo already there
    assert hub_server.calls("commit") == [500, 500, 200]
    assert "adapter_model.safetensors" in hub_server.files("alice/flaky")


def test_a_hub_that_keeps_failing_ends_with_the_retry_command_and_local_files_intact(hub_server, run_dir):
    final = run_dir / "final_model"
    before = snapshot(final)
    hub_server.fail("commit", times=10, status=500)

    with pytest.raises(FnsftError) as info:
        hub.push_folder(final, "alice/down", token=hub_server.token, private=False, revision="exp",
                        commit_message="my run")

    message = str(info.value)
    assert info.value.exit_code == 1
    assert hub_server.calls("commit") == [500] * hub.RETRY_ATTEMPTS
    assert f"failed after {hub.RETRY_ATTEMPTS} attempts: HTTP 500" in message
    assert (f"Local outputs are intact in {final}; retry with: fnsft push --model_dir {final} --hub_repo_id "
            "alice/down --no_hub_private --hub_revision exp --hub_commit_message 'my run'") in message
    assert hub_server.token not in message
    assert snapshot(final) == before


def test_a_client_error_is_not_retried(hub_server, run_dir):
    hub_server.fail("commit", times=1, status=403)
    with pytest.raises(FnsftError, match="HTTP 403") as info:
        hub.push_folder(run_dir / "adapter", "alice/forbidden", token=hub_server.token)
    assert hub_server.calls("commit") == [403]
    assert "attempts" not in str(info.value)


def test_connection_refused_gives_a_clear_error_and_keeps_local_files(hub_server, run_dir):
    final = run_dir / "final_model"
    before = snapshot(final)
    hub.preflight("alice/gone", hub_server.token)
    hub_server.stop()  # the Hub goes away while "training" runs

    start = time.monotonic()
    with pytest.raises(FnsftError) as info:
        hub.push_folder(final, "alice/gone", token=hub_server.token)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "cannot connect" in message and "Local outputs are intact" in message
    assert f"fnsft push --model_dir {final} --hub_repo_id alice/gone" in message
    assert snapshot(final) == before


def test_a_folder_containing_the_token_is_not_uploaded(hub_server, run_dir, tmp_path):
    folder = tmp_path / "final_model"
    shutil.copytree(run_dir / "final_model", folder)
    (folder / "run_config.yaml").write_text(f"hub_token: {hub_server.token}\n")

    with pytest.raises(FnsftError, match="run_config.yaml contains the Hub token; refusing to upload it") as info:
        hub.push_folder(folder, "alice/leaky", token=hub_server.token)
    assert hub_server.token not in str(info.value)
    assert hub_server.calls("commit") == [] and hub_server.repo("alice/leaky") is None


# ---- fnsft push ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, library", [
    ("final_model", "peft"), ("adapter", "peft"), ("merged_model", "transformers"), ("full", "transformers")])
def test_fnsft_push_detects_each_folder_kind(hub_server, run_dir, tiny_gpt2, monkeypatch, capsys, kind, library):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    folder = tiny_gpt2 if kind == "full" else run_dir / kind
    repo_id = f"alice/push-{kind.replace('_', '-')}"

    argv = ["--model_dir", str(folder), "--hub_repo_id", repo_id]
    assert run_guarded(hub_command.main, argv, prog="fnsft push") == 0

    meta, body = card(hub_server.files(repo_id)["README.md"])
    assert meta["library_name"] == library
    expected_title = {"peft": "A LoRA adapter", "transformers": ("A standalone model" if kind == "merged_model"
                                                                 else "A model fully fine-tuned")}[library]
    assert expected_title in body
    assert f"to {hub_server.url}/{repo_id}/commit/" in capsys.readouterr().out


def test_fnsft_push_no_hub_private_creates_a_public_repo_on_a_branch(hub_server, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    argv = ["--model_dir", str(run_dir / "merged_model"), "--hub_repo_id", "acme/shared", "--no_hub_private",
            "--hub_revision", "v1", "--hub_commit_message", "release v1"]

    assert run_guarded(hub_command.main, argv, prog="fnsft push") == 0

    assert hub_server.repo("acme/shared")["private"] is False
    assert hub_server.commits("acme/shared", "v1")[0]["summary"] == "release v1"
    assert "model.safetensors" in hub_server.files("acme/shared", "v1")


@pytest.mark.parametrize("argv, expected", [
    (["--model_dir", "{run}", "--hub_repo_id", "alice/x"], "is a run's output folder; pass {run}/final_model"),
    (["--model_dir", "{run}/nowhere", "--hub_repo_id", "alice/x"], "no such folder"),
    (["--model_dir", "{run}/final_model"], "--hub_repo_id is required"),
    (["--model_dir", "{run}/final_model", "--hub_repo_id", "alice"], "exactly one '/'"),
])
def test_fnsft_push_usage_errors_exit_2(hub_server, run_dir, capsys, argv, expected):
    argv = [a.replace("{run}", str(run_dir)) for a in argv]
    assert run_guarded(hub_command.main, argv, prog="fnsft push") == 2
    err = capsys.readouterr().err
    assert err.startswith("fnsft push: error: ") and expected.replace("{run}", str(run_dir)) in err
    assert hub_server.requests == []


def test_canary_token_never_appears_in_output_logs_or_files(hub_server, run_dir):
    token = hub_server.token  # every test token starts with hf_canary
    merged = run_dir / "merged_model"
    base = [FNSFT, "push", "--model_dir", str(merged), "--hub_token", token]
    env = hub_server.env(HF_DEBUG="1")  # the token comes from the flag; HF_DEBUG makes the client log every request

    ok = subprocess.run(base + ["--hub_repo_id", "alice/canary"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    hub_server.fail("commit", times=10)
    failed = subprocess.run(base + ["--hub_repo_id", "alice/canary-2"], capture_output=True, text=True, env=env,
                            timeout=120)
    rejected = subprocess.run([FNSFT, "push", "--model_dir", str(merged), "--hub_repo_id", "alice/canary-3",
                               "--hub_token", token + "x"], capture_output=True, text=True, env=env, timeout=120)

    assert failed.returncode == 1
    assert "Local outputs are intact" in failed.stderr
    assert (f"retry with: fnsft push --model_dir {merged} --hub_repo_id alice/canary-2 "
            "(with HF_TOKEN set to your token, or --hub_token)") in failed.stderr
    assert rejected.returncode == 2 and "rejected the token from --hub_token" in rejected.stderr
    for done in (ok, failed, rejected):
        assert token not in done.stdout and token not in done.stderr
    leaks = [p for root in (hub_server.root, run_dir) for p in root.rglob("*")
             if p.is_file() and token.encode() in p.read_bytes()]
    assert leaks == []


def test_canary_token_absent_from_in_process_logs(hub_server, run_dir, caplog, capsys):
    from huggingface_hub.utils import logging as hf_logging

    caplog.set_level("DEBUG")
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    try:
        hub_server.fail("commit", times=1)
        hub.preflight("alice/logged", hub_server.token)
        hub.push_folder(run_dir / "final_model", "alice/logged", token=hub_server.token)
    finally:
        hf_logging.set_verbosity(previous)
    assert "Upload attempt 1/4 failed (HTTP 500" in caplog.text
    captured = capsys.readouterr()
    assert hub_server.token not in caplog.text + captured.out + captured.err


def test_fnsft_cli_dispatches_push(hub_server, run_dir, monkeypatch):
    from functionalnetworkssft import cli

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert cli.main(["push", "--model_dir", str(run_dir / "adapter"), "--hub_repo_id", "alice/via-cli"]) == 0
    assert "adapter_config.json" in hub_server.files("alice/via-cli")
