"""Benchmark `fnsft merge` against PEFT merge_and_unload + save_pretrained on random Llama-style bf16 bases.

    python benchmarks/merge_bench.py --json benchmarks/merge_bench.json --contended

For each size (about 0.5, 2 and 8 GB of bf16 weights, sharded at 500 MB) it builds a random base and a random LoRA
adapter (r=16, all linear layers, non-zero B), then times, each in its own process: copying the base's files (the
physical floor), `fnsft merge --verify off`, PEFT's merge, and the default `fnsft merge` (verification on, streamed
block by block). PEFT runs only where its way of loading fits in memory. With --contended every timed run is repeated
beside one CPU-bound competing process, the same for fnsft and PEFT. Peak RSS is the kernel's own figure for each
child (wait4 rusage ru_maxrss). Linux carries ru_maxrss over from the parent across fork+exec, so this script never
imports torch itself: models are built in a child too, and the parent stays at a few MB. Files are read once before
timing, so all runs see a warm page cache, and dirty pages are flushed (sync) before each timed run and the copy, so
none pays for the writeback of the one before.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name: (hidden, intermediate, layers), vocab 32000, untied embeddings
    "0.5GB": (1024, 2816, 16),
    "2GB": (2048, 5632, 18),
    "8GB": (4096, 11008, 20),
}
# PEFT loads the base, merges in place and writes: its peak has measured about 1.2x the weights; this leaves room.
PEFT_MEMORY_FACTOR = 2.0
COMPETITOR = "while True: pass"
REFERENCE_SIZE = "2GB"

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""


def build(folder: Path, hidden: int, intermediate: int, layers: int) -> tuple[Path, Path, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = folder / "base", folder / "adapter"
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Random weights without the slow per-module init: normal values scaled like a trained model's.
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(base, max_shard_size="500MB")
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(adapter)
    return base, adapter, weights_gb


def build_in_child(folder: Path, size: str) -> float:
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import merge_bench as b; from pathlib import Path; "
            "print(json.dumps(b.build(Path(sys.argv[2]), *b.SIZES[sys.argv[3]])[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(folder), size],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def timed(command: list[str], contended: bool = False) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, as the kernel accounts it; contended: beside one
    CPU-bound competing process, started before and stopped after."""
    # Every run starts with no dirty pages pending: otherwise the kernel is still writing back the files the run
    # before wrote (or the freshly built model) while this one writes, and whichever runs first after a write pays.
    os.sync()
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if contended else None
    try:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def copy_floor(base: Path, target: Path) -> float:
    os.sync()
    started = time.perf_counter()
    shutil.copytree(base, target)
    return time.perf_counter() - started


def measure(folder: Path, base: Path, adapter: Path, weights_gb: float, verify_run: bool, contended: bool) -> dict:
    """The timed runs of one size, quiet or beside a competitor; keys get a contended_ prefix for the latter."""
    tag = "contended_" if contended else ""
    run: dict = {}
    fnsft = [sys.executable, "-m", "functionalnetworkssft", "merge", "--adapter_path", str(adapter),
             "--base_model_name_or_path", str(base), "--output_dir", str(folder / "fnsft")]
    seconds, rss = timed(fnsft + ["--verify", "off"], contended)
    run.update({f"{tag}fnsft_seconds": round(seconds, 2), f"{tag}fnsft_peak_rss_mb": round(rss)})
    shutil.rmtree(folder / "fnsft")
    if PEFT_MEMORY_FACTOR * weights_gb * 1e9 < available_bytes():
        seconds, rss = timed([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(folder / "peft")],
                             contended)
        run.update({f"{tag}peft_seconds": round(seconds, 2), f"{tag}peft_peak_rss_mb": round(rss)})
        shutil.rmtree(folder / "peft")
    if verify_run:
        seconds, rss = timed(fnsft, contended)  # the default: verification on, streamed
        report = json.loads((folder / "fnsft" / "merge_report.json").read_text())
        run.update({f"{tag}fnsft_verified_seconds": round(seconds, 2), f"{tag}fnsft_verified_peak_rss_mb": round(rss)})
        if not contended:
            verification = dict(report["verification"])
            verification.pop("blocks", None)  # per-block figures: in the merged folder's report, not the benchmark's
            run["verification"] = verification
        shutil.rmtree(folder / "fnsft")
    return run


def ratios(runs: list[dict], size: str = REFERENCE_SIZE) -> dict:
    """Against PEFT at 2 GB (the size the targets name) or else the largest size where PEFT ran; growth of fnsft's
    peak from the smallest size to it."""
    result: dict = {}
    compared = [r for r in runs if "peft_seconds" in r]
    if not compared:
        return result
    large, small = next((r for r in compared if r["size"] == size), compared[-1]), runs[0]
    result["compared_size"] = large["size"]
    result["time_ratio"] = round(large["fnsft_seconds"] / large["peft_seconds"], 3)
    result["rss_ratio"] = round(large["fnsft_peak_rss_mb"] / large["peft_peak_rss_mb"], 3)
    if "fnsft_verified_seconds" in large:
        result["default_time_ratio"] = round(large["fnsft_verified_seconds"] / large["peft_seconds"], 3)
        result["default_rss_ratio"] = round(large["fnsft_verified_peak_rss_mb"] / large["peft_peak_rss_mb"], 3)
    if "contended_peft_seconds" in large:
        if "contended_fnsft_verified_seconds" in large:
            result["contended_time_ratio"] = round(large["contended_fnsft_verified_seconds"]
                                                   / large["contended_peft_seconds"], 3)
        result["contended_off_time_ratio"] = round(large["contended_fnsft_seconds"] / large["contended_peft_seconds"],
                                                   3)
    if len(runs) > 1:
        result["fnsft_rss_growth"] = round(large["fnsft_peak_rss_mb"] / small["fnsft_peak_rss_mb"], 3)
        if "fnsft_verified_peak_rss_mb" in large:
            result["default_rss_growth"] = round(large["fnsft_verified_peak_rss_mb"]
                                                 / small["fnsft_verified_peak_rss_mb"], 3)
    return result


def main() -> None:
    # A terminated run still stops its competitor and removes its models (the `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--contended", action="store_true",
                        help="repeat every timed run beside one CPU-bound competing process")
    parser.add_argument("--no-verify-run", action="store_true", help="skip the default fnsft run (verification on)")
    parser.add_argument("--workdir", help="keep models here instead of a temporary folder")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            folder = Path(tmp) / size
            weights_gb = build_in_child(folder, size)
            base, adapter = folder / "base", folder / "adapter"
            run = {"size": size, "weights_gb": round(weights_gb, 3)}
            copy_floor(base, folder / "warm")  # warm the page cache, so every timed run reads from memory
            shutil.rmtree(folder / "warm")
            run["copy_seconds"] = round(copy_floor(base, folder / "copy"), 2)
            shutil.rmtree(folder / "copy")
            run.update(measure(folder, base, adapter, weights_gb, not args.no_verify_run, contended=False))
            if args.contended:
                run.update(measure(folder, base, adapter, weights_gb, not args.no_verify_run, contended=True))
            shutil.rmtree(folder)
            runs.append(run)
            print(json.dumps(run), flush=True)

    result = {"verification_in_timed_runs": "fnsft_verified_* (the default)", "cpu_count": os.cpu_count(),
              "contended": args.contended, "runs": runs, **ratios(runs)}
    compared = [r for r in runs if "peft_seconds" in r]
    if compared and compared[-1]["size"] != result.get("compared_size"):
        result["largest_compared"] = ratios(runs, compared[-1]["size"])
    print("\n| size | weights GB | copy s | fnsft --verify off s | fnsft default s | PEFT s | off peak MB | "
          "default peak MB | PEFT peak MB |\n|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['size']} | {run['weights_gb']} | {run['copy_seconds']} | {run['fnsft_seconds']} | "
              f"{run.get('fnsft_verified_seconds', '-')} | {run.get('peft_seconds', '-')} | "
              f"{run['fnsft_peak_rss_mb']} | {run.get('fnsft_verified_peak_rss_mb', '-')} | "
              f"{run.get('peft_peak_rss_mb', '-')} |")
    if args.contended:
        print("\nbeside one busy process:\n| size | fnsft --verify off s | fnsft default s | PEFT s |\n"
              "|---|---|---|---|")
        for run in runs:
            print(f"| {run['size']} | {run['contended_fnsft_seconds']} | "
                  f"{run.get('contended_fnsft_verified_seconds', '-')} | {run.get('contended_peft_seconds', '-')} |")
    print("\n" + "  ".join(f"{k} {v}" for k, v in result.items() if k not in ("runs", "cpu_count")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
