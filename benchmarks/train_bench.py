"""Training throughput: fnsft's default batching against TRL's SFTTrainer and a plain padding Trainer.

    python benchmarks/train_bench.py --json benchmarks/train_bench.json

Every arm trains the same random Llama-style model (4 layers, hidden 256) with LoRA (r 16, all linear layers) for
one epoch over the same 256 chats, whose lengths follow a long tail from 16 to 1024 tokens, at 8 examples per step,
with the same optimizer, learning rate, seed and assistant-only loss:

  fnsft          `fnsft train` with its defaults (from the chats' JSONL file, as a user runs it): padding-free
  trl_default    TRL's SFTTrainer with a default SFTConfig (padded batches), on the same tokenized examples
  trl_best       TRL's fastest mode here: the faster of padding_free=True and packing=True (bfd)
  padded         a plain transformers Trainer padding every batch to its longest example
  fnsft_*        fnsft's other batching modes, to show why the default is what it is

Each arm runs in its own process, twice, in alternating rounds; throughput is non-padding tokens per second of the
Trainer's train_runtime (the mean of the two runs), and peak RSS is the process's VmHWM. Run it on a quiet machine:
it measures time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES, BATCH, RANK, LR, SEED = int(os.environ.get("TRAIN_BENCH_EXAMPLES", 256)), 8, 16, 2e-4, 0
ROUNDS = 2
FNSFT_VARIANTS = {"fnsft_padded_grouped": ["--no_padding_free", "--group_by_length"],
                  "fnsft_padding_free_grouped": ["--group_by_length"],
                  "fnsft_padded": ["--no_padding_free"],
                  "fnsft_packing": ["--packing"]}
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask work seem feel try leave call good new first last long great little own other "
         "old right big high different small large next early young important few public bad same able").split()


def build(folder: Path) -> tuple[Path, Path]:
    """The random model and its tokenizer, and the long-tailed chats, built once for every arm."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = np.random.default_rng(SEED)
    corpus = [" ".join(rng.choice(WORDS, 50)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|pad|>", "<|im_start|>",
                                                                                          "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", unk_token="<|pad|>")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                               "{{ '<|im_start|>assistant\n' }}{% endif %}")
    model_dir = folder / "model"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # Long-tailed lengths: most chats are short, a few run to the 1024-token budget.
    lengths = np.clip(rng.pareto(1.2, EXAMPLES) * 60 + 16, 16, 1024).astype(int)
    rows = []
    for length in lengths:
        words = max(4, int(length * 0.75))  # about 1.3 tokens per word with this vocabulary
        prompt, reply = max(2, words // 3), max(2, words - words // 3)
        rows.append({"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, prompt))},
                                  {"role": "assistant", "content": " ".join(rng.choice(WORDS, reply))}]})
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tokenized(model_dir: Path, data: Path):
    """The chats as fnsft tokenizes them (input_ids + assistant_masks, cut to 1024): every arm trains on these."""
    import datasets
    from transformers import AutoTokenizer

    from functionalnetworkssft.data import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = [tokenize_example(tokenizer, r, False, 1024) for r in rows]
    return tokenizer, datasets.Dataset.from_list([{k: e[k] for k in ("input_ids", "assistant_masks")}
                                                  for e in examples])


def lora():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def common_args(out: Path) -> dict:
    return {"output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": BATCH,
            "learning_rate": LR, "seed": SEED, "data_seed": SEED, "logging_steps": 8, "save_strategy": "no",
            "report_to": "none", "use_cpu": True, "dataloader_pin_memory": False, "warmup_steps": 0.03}


def arm(name: str, model_dir: Path, data: Path, out: Path) -> dict:
    import torch

    if name.startswith("fnsft"):
        from functionalnetworkssft.options import parse
        from functionalnetworkssft.training.config import TrainConfig
        from functionalnetworkssft.training import run

        flags = ["--model_name_or_path", str(model_dir), "--dataset_name_or_path", str(data), "--output_dir", str(out),
                 "--use_peft", "--lora_dropout", "0", "--lora_alpha", str(2 * RANK), "--num_train_epochs", "1",
                 "--per_device_train_batch_size", str(BATCH), "--learning_rate", str(LR), "--seed", str(SEED),
                 "--validation_split", "0", "--save_steps", "100000", "--logging_steps", "8",
                 *FNSFT_VARIANTS.get(name, [])]
        run(parse(TrainConfig, flags, "fnsft train"))
        state = json.loads((out / "trainer_state.json").read_text())
        history = state["log_history"]
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
        from trl import SFTConfig, SFTTrainer

        set_seed(SEED)  # as fnsft seeds before the adapter is created: the same initial weights in every arm

        tokenizer, dataset = tokenized(model_dir, data)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        if name == "padded":
            from peft import get_peft_model

            set_seed(SEED)

            dataset = dataset.map(lambda e: {"labels": [t if m else -100 for t, m in zip(e["input_ids"],
                                                                                      e["assistant_masks"])]},
                                  remove_columns=["assistant_masks"])
            trainer = Trainer(model=get_peft_model(model, lora()), args=TrainingArguments(**common_args(out)),
                              train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
        else:
            extra = {"trl_padding_free": {"padding_free": True, "max_length": None},
                     "trl_packing": {"packing": True, "packing_strategy": "bfd", "max_length": 1024}}.get(name, {})
            trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(out), **extra), train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=lora())
        trainer.train()
        history = trainer.state.log_history
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    losses = [h["loss"] for h in history if "loss" in h] or [h["train_loss"] for h in history if "train_loss" in h]
    tokens = _tokens(model_dir, data)
    return {"arm": name, "tokens": tokens, "train_runtime_s": runtime, "tok_s": tokens / runtime,
            "final_loss": losses[-1], "peak_rss_mb": peak_rss_mb()}


def _tokens(model_dir: Path, data: Path) -> int:
    _, dataset = tokenized(model_dir, data)
    return sum(len(ids) for ids in dataset["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        workdir = Path(args.workdir)
        result = arm(args.arm, workdir / "model", workdir / "chats.jsonl", workdir / f"out-{Path(args.json).stem}")
        Path(args.json).write_text(json.dumps(result))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build(workdir)
        runs: dict[str, list[dict]] = {}
        # Every arm twice, in alternating rounds, so that a slow moment of the machine does not favour one arm.
        for round_ in range(ROUNDS):
            for name in ["fnsft", "trl_default", "trl_padding_free", "trl_packing", "padded", *FNSFT_VARIANTS]:
                result_file = workdir / f"{name}-{round_}.json"
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
                done = subprocess.run([sys.executable, __file__, "--arm", name, "--workdir", str(workdir), "--json",
                                       str(result_file)], env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(result_file.read_text())
                runs.setdefault(name, []).append(result)
                print(f"round {round_ + 1} {name:28s} {result['tok_s']:8.0f} tok/s  peak {result['peak_rss_mb']:6.0f} "
                      f"MB  final loss {result['final_loss']:.4f}", flush=True)
        results = {name: {"tok_s": sum(r["tok_s"] for r in rs) / len(rs), "runs_tok_s": [r["tok_s"] for r in rs],
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "final_loss": rs[0]["final_loss"],
                          "tokens": rs[0]["tokens"]} for name, rs in runs.items()}
    best = max(("trl_padding_free", "trl_packing"), key=lambda n: results[n]["tok_s"])
    summary = {
        "fnsft_tok_s": results["fnsft"]["tok_s"], "trl_tok_s": results["trl_default"]["tok_s"],
        "trl_best_tok_s": results[best]["tok_s"], "trl_best_mode": best.removeprefix("trl_"),
        "padded_tok_s": results["padded"]["tok_s"],
        "ratio_vs_trl": results["fnsft"]["tok_s"] / results["trl_default"]["tok_s"],
        "ratio_vs_trl_best": results["fnsft"]["tok_s"] / results[best]["tok_s"],
        "ratio_vs_padded": results["fnsft"]["tok_s"] / results["padded"]["tok_s"],
        "fnsft_peak_rss_mb": results["fnsft"]["peak_rss_mb"], "trl_peak_rss_mb": results["trl_default"]["peak_rss_mb"],
        "fnsft_final_loss": results["fnsft"]["final_loss"], "trl_final_loss": results["trl_default"]["final_loss"],
        "trl_best_final_loss": results[best]["final_loss"], "padded_final_loss": results["padded"]["final_loss"],
        "arms": results, "examples": EXAMPLES, "batch": BATCH, "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.json).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(("ratio", "trl_best_mode"))}, indent=1))


if __name__ == "__main__":
    main()
