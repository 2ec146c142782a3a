"""What the forgetting probe and the guards cost, at the quickstart's settings (SmolLM2-135M-Instruct, LoRA r 16,
12 steps of 8 examples, evaluation every 6 steps).

    python benchmarks/forgetting_cost.py --json benchmarks/forgetting_cost.json

- The probe: wall time of the whole `make quickstart` command (fnsft train --config examples/quickstart.yaml) with
  --forgetting_probe off and on; on, with the base's probe text already cached (a rerun) and with it written first
  (the first run on a model). The issue's bound: at most 10% of the run's time.
- The guards on the quickstart as it is: its last evaluation's validation loss and the probe's KL and agreement.
- The guards: seconds per optimizer step (the Trainer's train_runtime over its steps, evaluation and probe off) of
  plain LoRA and of each guard at its default weight. The issue's bound for the kl guard: at most 1.35x plain.

Each configuration runs --repeats times, interleaved, and the median is reported. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

PROBE_ARMS = {"probe off": ["--forgetting_probe", "off"], "probe on (text written first)": ["COLD"],
              "probe on (text cached)": []}
# The quickstart as it is, with each guard: what it keeps of the task and of the base (its last evaluation).
QUALITY_ARMS = {"kl guard, whole run": ["--forgetting_guard", "kl"],
                "masked_kl guard, whole run": ["--forgetting_guard", "masked_kl"],
                "replay guard, whole run": ["--forgetting_guard", "replay"]}
STEP_ARMS = {"plain LoRA": [], "kl guard": ["--forgetting_guard", "kl"],
             "masked_kl guard": ["--forgetting_guard", "masked_kl"], "replay guard": ["--forgetting_guard", "replay"]}


def run(args: list[str], out: Path, cache: Path, config: Path = QUICKSTART) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "functionalnetworkssft", "train", "--config", str(config),
                             "--output_dir", str(out), "--overwrite_output_dir", *args],
                            capture_output=True, text=True, env={**os.environ, "FNSFT_CACHE": str(cache)}, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"fnsft train {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    summary = next(h for h in history if "train_runtime" in h)
    info = {"train_runtime": summary["train_runtime"], "steps": history[-1]["step"]}
    evaluations = [h for h in history if "eval_loss" in h]
    if evaluations:
        last = evaluations[-1]
        info.update({key: last[key] for key in ("eval_loss", "eval_forgetting_kl", "eval_base_agreement",
                                                "eval_forgetting_nll_change") if key in last})
    return wall, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="results file (overwritten)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved")
    parser.add_argument("--top_k_only", metavar="ADAPTER", help="measure only the top-k snapshot's error, on this "
                        "trained adapter (e.g. outputs/quickstart/final_model), into the existing --json")
    args = parser.parse_args()
    if args.top_k_only:
        report = json.loads(Path(args.json).read_text())
        report["top_k_approximation"] = top_k_error(Path(args.top_k_only))
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print_top_k(report["top_k_approximation"])
        return
    work = Path(tempfile.mkdtemp(prefix="fnsft-cost-"))
    from functionalnetworkssft.paths import cache_dir

    # The GGUF conversion and tokenized data come from the user's cache (as in a rerun of the quickstart); only the
    # probe's text is kept apart, so that "written first" really writes it.
    shared = cache_dir()
    import yaml

    # The steps alone: no evaluation, probe, samples or merge around them.
    steps_only = work / "steps.yaml"
    settings = yaml.safe_load(QUICKSTART.read_text())
    for key in ("sample_prompts", "merge_adapter_with_base", "eval_steps"):
        settings.pop(key, None)
    settings.update(validation_split=0.0, eval_strategy="no", forgetting_probe="off",
                    dataset_name_or_path=str(ROOT / settings["dataset_name_or_path"]))
    steps_only.write_text(yaml.safe_dump(settings))
    results: dict[str, list] = {name: [] for name in (*PROBE_ARMS, *QUALITY_ARMS, *STEP_ARMS)}
    try:
        for repeat in range(args.repeats):
            for name, extra in PROBE_ARMS.items():
                cache = work / "cache"
                if cache.exists():
                    shutil.rmtree(cache)
                cache.mkdir()
                for entry in shared.iterdir() if shared.is_dir() else []:
                    if entry.name != "general_text":
                        (cache / entry.name).symlink_to(entry)
                if extra != ["COLD"] and (shared / "general_text").is_dir():
                    shutil.copytree(shared / "general_text", cache / "general_text")
                wall, info = run([a for a in extra if a != "COLD"], work / "out", cache)
                if (cache / "general_text").is_dir():  # what this run wrote is the cached text of the next
                    shutil.copytree(cache / "general_text", shared / "general_text", dirs_exist_ok=True)
                results[name].append({"wall_s": round(wall, 2), **info})
                print(f"[{repeat}] {name}: {wall:.1f} s wall", file=sys.stderr, flush=True)
            for name, extra in QUALITY_ARMS.items():
                wall, info = run(extra, work / "out", shared)
                results[name].append({"wall_s": round(wall, 2), **info})
                print(f"[{repeat}] {name}: {wall:.1f} s wall", file=sys.stderr, flush=True)
            for name, extra in STEP_ARMS.items():
                _, info = run(extra, work / "out", shared, steps_only)
                per_step = info["train_runtime"] / info["steps"]
                results[name].append({"s_per_step": round(per_step, 3), **info})
                print(f"[{repeat}] {name}: {per_step:.2f} s per step", file=sys.stderr, flush=True)
        approximation = top_k_error(work / "out" / "final_model")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    off = statistics.median(r["wall_s"] for r in results["probe off"])
    plain = statistics.median(r["s_per_step"] for r in results["plain LoRA"])
    summary = {}
    for name in PROBE_ARMS:
        wall = statistics.median(r["wall_s"] for r in results[name])
        summary[name] = {"wall_s": wall, "share_of_run": round((wall - off) / wall, 3)}
    for name in QUALITY_ARMS:
        summary[name] = {"wall_s": statistics.median(r["wall_s"] for r in results[name])}
    for name in (*PROBE_ARMS, *QUALITY_ARMS):
        for key in ("eval_loss", "eval_forgetting_kl", "eval_base_agreement"):
            values = [r[key] for r in results[name] if key in r]
            if values:
                summary[name][key] = statistics.median(values)
    for name in STEP_ARMS:
        step = statistics.median(r["s_per_step"] for r in results[name])
        summary[name] = {"s_per_step": step, "vs_plain": round(step / plain, 3)}
    report = {"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "runs": results, "summary": summary,
              "top_k_approximation": approximation,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count()}}
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print("| configuration | median | relative | validation loss | KL(base||tuned) | agreement |")
    print("|---|---|---|---|---|---|")
    for name, row in summary.items():
        quality = " | ".join(f"{row[k]:.4f}" if k in row else "" for k in ("eval_loss", "eval_forgetting_kl",
                                                                           "eval_base_agreement"))
        if "share_of_run" in row:
            print(f"| {name} | {row['wall_s']:.1f} s per run | probe share {row['share_of_run']:+.1%} | {quality} |")
        elif "wall_s" in row:
            print(f"| {name} | {row['wall_s']:.1f} s per run | | {quality} |")
        else:
            print(f"| {name} | {row['s_per_step']:.2f} s per step | {row['vs_plain']:.2f}x plain | | | |")
    print_top_k(approximation)


def print_top_k(approximation: dict) -> None:
    print(f"\nThe probe's top-k snapshot against the exact KL ({approximation['exact_kl']:.5f} nats per token):")
    for row in approximation["sizes"]:
        print(f"  k = {row['k']}: {row['top_k_kl']:.5f} ({row['relative_error']:+.2%})")


def top_k_error(adapter: Path) -> dict:
    """The probe reads the base from a top-k snapshot: its KL against the exact one (the adapter switched off) for
    a model the quickstart trained, on the probe's own windows, at several k (the product's is reference.TOP_K)."""
    import torch
    from peft import PeftModel

    from functionalnetworkssft import modeling
    from functionalnetworkssft.forgetting import reference, text
    from functionalnetworkssft.forgetting.probe import ForgettingProbe
    from functionalnetworkssft.forgetting.plan import fingerprint
    from functionalnetworkssft.training.config import TrainConfig

    cfg = TrainConfig(model_name_or_path=yaml_value("model_name_or_path"), output_dir="unused")
    source = modeling.resolve(cfg.model_name_or_path)
    tokenizer = modeling.load_tokenizer(source)
    base = modeling.load_model(source, torch.float32).eval()
    windows = text.generated(base, tokenizer, text.PROBE_WINDOWS, cfg.seed, fingerprint(source, cfg),
                             text.PROBE_TOKENS)
    snapshots = {k: reference.TopK.of(base, torch.tensor(windows), k) for k in (256, 1024, reference.TOP_K)}
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    exact = ForgettingProbe(windows, reference.AdapterOff()).measure(tuned)["forgetting_kl"]
    sizes = []
    for k, snapshot in snapshots.items():
        approx = ForgettingProbe(windows, snapshot).measure(tuned)["forgetting_kl"]
        sizes.append({"k": k, "top_k_kl": approx, "relative_error": (approx - exact) / exact})
    return {"adapter": adapter.name, "exact_kl": exact, "sizes": sizes}


def yaml_value(key: str):
    import yaml

    return yaml.safe_load(QUICKSTART.read_text())[key]


if __name__ == "__main__":
    main()
