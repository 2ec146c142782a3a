"""Every stage a practitioner runs, on a tiny model of one family: LoRA training with the merge and its verification,
full fine-tuning, GGUF export (each type, verified; compared with llama.cpp's own converter where it is installed),
the Modelfile, and a chat reply. test_families_*.py run these on their share of the families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CONVERSATIONS
from families import Family

ROWS = [{"messages": m} for m in CONVERSATIONS[:12]]
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
# The canonical converter (llama.cpp's convert_hf_to_gguf.py with its gguf-py), which `make setup` unpacks here.
CONVERTER = Path(__file__).resolve().parents[1] / ".venv" / "llama.cpp"
# llama.cpp's converter recognises a byte-level BPE tokenizer by hashing how it splits a test text, which only works
# for published vocabularies: for these tiny ones it is told the name fnsft detected.
PRE_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}
# Keys transformers 5 no longer writes into config.json under the names llama.cpp's converter reads; the comparison
# gives the converter a copy with the old names (the model is the same).
OLD_CONFIG_KEYS = {"gpt2": {"n_ctx": 256}, "gpt-neox": {"rotary_pct": 0.25}, "falcon": {"num_kv_heads": 1}}
# What fnsft writes on purpose where llama.cpp's converter differs (the tests name each):
#  - whether encoding adds BOS/EOS, and whether SentencePiece puts a space first, stated rather than left to defaults;
#  - Gemma-2's rope base, which the converter leaves out (llama.cpp then assumes 10000);
#  - tokens declared special in tokenizer.json are control tokens (the converter reads them only from
#    tokenizer_config.json, where transformers 5 no longer writes them), with the scores such tokens get.
#  - GPT-NeoX's and Falcon's rope base, and Falcon's context length from the config (the converter writes 2048).
STATED_KEYS = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
               "gemma2.rope.freq_base", "tokenizer.ggml.unknown_token_id", "gptneox.rope.freq_base",
               "falcon.rope.freq_base", "falcon.context_length"}
SPECIAL_KEYS = {"tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.tokens"}
# The marker each family's template opens a user turn with.
USER_TURNS = ("<|start_header_id|>user", "[INST]", "<|im_start|>user", "<start_of_turn>user", "<|user|>",
              "<|start_of_role|>user")


def train_lora(base: Path, out: Path, capsys) -> tuple[Path, str]:
    from functionalnetworkssft import TrainConfig, train

    train(TrainConfig(model_name_or_path=str(base), output_dir=str(out), use_peft=True, max_steps=2,
                      validation_split=0, merge_adapter_with_base=True, per_device_train_batch_size=2,
                      learning_rate=1e-2, forgetting_probe="off"), train_dataset=ROWS)
    return out, capsys.readouterr().out


def train_full(base: Path, out: Path) -> Path:
    from functionalnetworkssft import TrainConfig, train

    train(TrainConfig(model_name_or_path=str(base), output_dir=str(out), max_steps=1, validation_split=0,
                      per_device_train_batch_size=2, forgetting_probe="off"), train_dataset=ROWS)
    return out / "final_model"


def check_lora(family: Family, base: Path, out: Path, printed: str) -> None:
    merged = out / "merged_model"
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]
    assert report["verification"]["top1_agreement"] == 1.0
    if family.tokenizer == "sentencepiece":
        # transformers 5 does not write it; fnsft carries the base's into every folder it writes.
        for folder in (out / "final_model", out / "adapter", merged):
            assert (folder / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes(), folder
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    if family.moe:
        # PEFT reaches the stacked expert weights, which take no dropout: the default becomes 0, said in one line.
        assert adapter["lora_dropout"] == 0.0 and adapter["target_parameters"]
        assert "LoRA: dropout 0, because LoRA reaches this mixture of experts' stacked weights" in printed
        # Merged as LoRA on each expert's own tensors: per layer the 4 attention projections, the router, and the
        # gate, up and down projections of every expert.
        config = json.loads((base / "config.json").read_text())
        experts = config.get("num_local_experts") or config["num_experts"]
        assert report["lora_modules"] == config["num_hidden_layers"] * (4 + 1 + 3 * experts)
    else:
        assert adapter["lora_dropout"] == 0.05 and not adapter.get("target_parameters")


def check_full(family: Family, base: Path, final: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.model_type == json.loads((base / "config.json").read_text())["model_type"]
    if family.tokenizer == "sentencepiece":
        assert (final / "tokenizer.model").is_file()


def check_gguf(family: Family, model_dir: Path, out: Path, outtype: str) -> dict:
    from functionalnetworkssft.export import export_gguf
    from functionalnetworkssft.export.modelfile import end_tokens

    report = export_gguf(model_dir, out / f"{family.name}-{outtype}.gguf", outtype=outtype)
    check = report["verification"]
    assert check["status"] == "passed", check
    assert check["weights_equal_to_rounded_source"] and not check["parameters_not_in_file"]
    assert not check["tokenizer_mismatches"] and check["chat_template_equal"] and not check["metadata_mismatches"]
    expected_model = "llama" if family.tokenizer == "sentencepiece" else "gpt2"
    assert report["tokenizer"]["model"] == expected_model
    modelfile = (out / "Modelfile").read_text()
    for stop in end_tokens(model_dir):
        assert f'PARAMETER stop "{stop}"' in modelfile
    if family.template is None:
        assert not any(line.startswith("TEMPLATE") for line in modelfile.splitlines())
    else:
        assert 'TEMPLATE """' in modelfile, modelfile
    return report


def check_reply(family: Family, model_dir: Path) -> None:
    from functionalnetworkssft import data
    from functionalnetworkssft.generate import load_for_inference, reply

    model, tokenizer = load_for_inference(str(model_dir))
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = tokenizer.decode(data.render_prompt_ids(tokenizer, messages))
    if family.template is not None:  # the family's own chat template renders the conversation
        assert any(marker in prompt for marker in USER_TURNS), prompt
    assert "Hello there" in prompt
    text = reply(model, tokenizer, messages, max_new_tokens=4)
    assert isinstance(text, str)


def compare_with_llama_cpp(family: Family, model_dir: Path, ours: Path, work: Path) -> list[str]:
    """The differences between fnsft's f32 file and llama.cpp's converter's, other than the stated ones."""
    import gguf
    import numpy as np

    theirs = work / "llama-cpp.gguf"
    pre = PRE_NAMES.get(family.pre or "", "-")
    env = {**os.environ, "PYTHONPATH": "", "FNSFT_OLD_HPARAMS": json.dumps(OLD_CONFIG_KEYS.get(family.name, {}))}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_cpp_convert.py")), str(CONVERTER), pre,
                          str(model_dir), "--outfile", str(theirs), "--outtype", "f32"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    read = {path: gguf.GGUFReader(path) for path in (ours, theirs)}
    differences = []
    fields = {path: {k: f for k, f in r.fields.items() if not k.startswith(("GGUF.", "general."))}
              for path, r in read.items()}
    for key in sorted(set(fields[ours]) | set(fields[theirs])):
        if key in STATED_KEYS or (key in SPECIAL_KEYS and family.tokenizer == "sentencepiece"):
            continue
        mine, other = fields[ours].get(key), fields[theirs].get(key)
        if mine is None or other is None or mine.contents() != other.contents():
            differences.append(key)
    tensors = {path: {t.name: t for t in r.tensors} for path, r in read.items()}
    for name in sorted(set(tensors[ours]) | set(tensors[theirs])):
        mine, other = tensors[ours].get(name), tensors[theirs].get(name)
        if mine is None or other is None or mine.tensor_type != other.tensor_type or \
                not np.array_equal(np.asarray(mine.data), np.asarray(other.data)):
            differences.append(name)
    return differences
