"""The checks a CPU machine cannot make, run on a CUDA GPU: bf16 LoRA with the merge and a GGUF export, QLoRA with
bitsandbytes' CUDA kernels and its merge, full fine-tuning with packing, fp16 mixed precision with loss scaling,
generation from the merged model, and flash attention refused in one line where its package is missing.

Every step is the real command line (`python -m functionalnetworkssft ...`) on a small Llama built here (nothing is
downloaded). Usage, on a machine with a GPU and fnsft installed:

    python benchmarks/gpu_check.py --json gpu_check.json

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["Hello, how are you? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
          "What is the capital of France? Paris is the capital of France.", "0123456789 abcdefghijklmnopqrstuvwxyz"]
QUESTIONS = [("What is the capital of France?", "Paris."), ("Say hello.", "Hello, how are you?"),
             ("Count to three.", "1 2 3"), ("Name a fast animal.", "The quick brown fox.")]


def build_model(folder: Path) -> None:
    """A Llama of 4 layers, hidden size 256 (whole 4-bit blocks), stored in bfloat16, with a ChatML tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS * 20, trainer=trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fnsft(*args: str, timeout: float = 300) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "functionalnetworkssft", *args], capture_output=True, text=True,
                              timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
    tail = [line for line in (out + err).splitlines() if line.strip()][-6:]
    return {"command": "fnsft " + " ".join(args), "rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "tail": tail, "stdout": out, "stderr": err}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    for name in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "huggingface_hub"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # a missing library is a result to report, not a crash
            env[name] = f"missing: {exc}"
    print(json.dumps(env))
    work = Path(tempfile.mkdtemp(prefix="fnsft-gpu-"))
    model, data = work / "model", work / "data.jsonl"
    build_model(model)
    with open(data, "w") as handle:
        for i in range(64):
            question, answer = QUESTIONS[i % len(QUESTIONS)]
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    common = ["--model_name_or_path", str(model), "--dataset_name_or_path", str(data), "--max_steps", "20",
              "--per_device_train_batch_size", "8", "--logging_steps", "5", "--save_steps", "10"]
    checks = {}
    checks["lora_bf16_merge_gguf"] = fnsft("train", *common, "--output_dir", str(work / "lora"), "--use_peft",
                                           "--merge_adapter_with_base", "--convert_to_gguf", "--gguf_outtype", "q8_0",
                                           "--sample_prompts", "Say hello.")
    checks["qlora_4bit_merge"] = fnsft("train", *common, "--output_dir", str(work / "qlora"), "--use_peft",
                                       "--use_4bit", "--merge_adapter_with_base")
    checks["qlora_merge_again_standalone"] = fnsft("merge", "--adapter_path", str(work / "qlora" / "adapter"),
                                                   "--output_dir", str(work / "qlora-merged"))
    checks["full_bf16_packing"] = fnsft("train", *common, "--output_dir", str(work / "full"), "--packing",
                                        "--max_seq_length", "128")
    checks["lora_fp16_mixed_precision"] = fnsft("train", *common, "--output_dir", str(work / "fp16"), "--use_peft",
                                                "--torch_dtype", "float32", "--fp16")
    checks["generate_merged"] = fnsft("generate", str(work / "lora" / "merged_model"), "--prompt", "Say hello.",
                                      "--max_new_tokens", "8")
    flash = fnsft("train", *common, "--output_dir", str(work / "flash"), "--use_peft", "--attn_implementation",
                  "flash_attention_2")
    flash["expected_rc"] = 0 if _installed("flash_attn") else 2
    checks["flash_attention_2"] = flash

    facts = {}
    for name in ("lora", "qlora"):
        report = work / name / "merged_model" / "merge_report.json"
        config = work / name / "merged_model" / "config.json"
        if report.is_file() and config.is_file():
            facts[name] = {"verification": json.loads(report.read_text()).get("verification", {}).get("status"),
                           "dtype": json.loads(config.read_text()).get("dtype")}
    passed = {name: check["rc"] == check.get("expected_rc", 0) for name, check in checks.items()}
    passed["lora_merged_is_bf16_and_verified"] = facts.get("lora") == {"verification": "passed", "dtype": "bfloat16"}
    passed["qlora_merged_verified"] = (facts.get("qlora") or {}).get("verification") == "passed"
    passed["lora_gguf_written"] = (work / "lora" / "model.gguf").is_file() and (work / "lora" / "Modelfile").is_file()
    result = {"environment": env, "passed": passed, "merged": facts,
              "checks": {name: {k: v for k, v in check.items() if k not in ("stdout", "stderr")}
                         for name, check in checks.items()}}
    for name, ok in passed.items():
        check = checks.get(name, {})
        print(f"{'PASS' if ok else 'FAIL'} {name} ({check.get('seconds', '-')} s)")
        if not ok and check:
            print("   " + "\n   ".join(check["tail"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        for name, check in checks.items():  # the whole output of a failed command, for its diagnosis
            if not passed[name]:
                Path(args.json).with_name(f"{name}.log").write_text(f"{check['stdout']}\n--- stderr ---\n"
                                                                    f"{check['stderr']}")
    return 0 if all(passed.values()) else 1


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
