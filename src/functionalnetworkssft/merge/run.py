"""`fnsft merge`: the merge from start to end. Check flags and inputs, hold the target, read the adapter and the
base's layout, plan, write into a staging folder, verify, rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft.errors import FnsftError, MergeError, UsageError, describe_write_error
from functionalnetworkssft.merge.adapter import Adapter, read_adapter, read_adapter_config, resolve_targets
from functionalnetworkssft.merge.architecture import architecture, declares_quantization
from functionalnetworkssft.merge.inputs import sha256_file
from functionalnetworkssft.merge.io import BaseWeights, parse_size
from functionalnetworkssft.merge.plan import _resolve, build_plan
from functionalnetworkssft.merge.qlora import read_training_record
from functionalnetworkssft.merge.report import MergeReport
from functionalnetworkssft.merge.write import DTYPES, move_into_place, write_merged
from functionalnetworkssft.outputs import FolderLock
from functionalnetworkssft.paths import missing_local, within
from functionalnetworkssft.records import MERGE_REPORT, TRAINING_RECORD
from functionalnetworkssft.weights import model_folder_problem

# Seconds a thread may hold the GIL while another waits, during the write beside the reference model's build.
SWITCH_INTERVAL = 1e-4

@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _prompt_gil_handover(active: bool):
    """While another thread builds the reference model (imports: pure Python, holding the GIL), the write gives the
    GIL up at every torch call and waits up to the switch interval (5 ms) to get it back, several times a row block."""
    before = sys.getswitchinterval()
    if active:
        sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def idle_cores() -> int:
    """Cores not busy with other work right now. The verification's matrix products use them all when the machine
    is quiet (2.9 s against 4.1 s with one thread, 2 GB on 2 cores), but beside one busy process two threads wait on
    each other and take twice as long as one (10.4 s against 5.0 s)."""
    import psutil

    cores = torch.get_num_threads()  # torch's default: the cores this process may run on
    total = os.cpu_count() or cores
    busy = psutil.cpu_percent(interval=0.1) / 100 * total
    return max(1, min(cores, round(total - busy)))


def _full_check_problem(base: BaseWeights) -> str | None:
    """--verify full loads base+adapter and the merged model whole in float32: refused up front where that cannot
    fit, rather than killed for memory after the merge."""
    import psutil

    need = 2 * 4 * sum(base.info(n).numel for n in base.names()) + (2 << 30)
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        return (f"--verify full needs about {need / 2**30:.1f} GiB of RAM for two float32 models, "
                f"{available / 2**30:.1f} GiB is available; use --verify on, which checks one block at a time.")
    return None


def _resolve_base(name: str, trust_remote_code: bool) -> Path:
    path = Path(name).expanduser()
    why = missing_local(name, "model folder")
    if why:
        raise UsageError(f"--base_model_name_or_path {name}: {why}.")
    if path.is_dir():
        problem = model_folder_problem(path) if (path / "config.json").is_file() else "it has no config.json"
        if problem:
            raise MergeError(f"--base_model_name_or_path {name}: {problem}; re-download or re-save the base model.")
        return path
    if path.exists():
        raise UsageError(f"--base_model_name_or_path {name}: not a model folder.")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "*.py", "*.tiktoken"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.model", "*.txt", "*.py"]))
        return folder
    except Exception as exc:  # network, auth, missing repo: all become one actionable line
        raise MergeError(f"--base_model_name_or_path {name}: not a local folder and could not be downloaded from "
                         f"the Hugging Face Hub ({type(exc).__name__}); pass a local model folder.") from None


def _usage_problems(dtype, verify, device, qlora_merge_base, max_shard_size) -> list[str]:
    problems = []
    if dtype != "auto" and dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16.")
    if verify not in ("auto", "on", "full", "off"):
        problems.append(f"--verify {verify}: choose auto, on, full or off.")
    if device not in ("cpu", "cuda"):
        problems.append(f"--device {device}: choose cpu or cuda.")
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible; use --device cpu.")
    if qlora_merge_base not in ("original", "dequantized"):
        problems.append(f"--qlora_merge_base {qlora_merge_base}: choose original or dequantized.")
    try:
        parse_size(max_shard_size)
    except UsageError as exc:
        problems.extend(exc.problems)
    return problems


def _output_problem(output: Path, inputs: dict[str, Path]) -> str | None:
    """Why the merged model may not go to `output`: a file, a foreign folder, or a folder holding an input."""
    if output.exists() and not output.is_dir():
        return f"--output_dir {output} is a file; name a folder."
    for flag, path in inputs.items():
        if within(path, output) or within(output, path):
            return f"--output_dir {output} overlaps {flag} {path}; choose a new folder for the merged model."
    if not output.is_dir() or not any(output.iterdir()):
        return None
    try:
        report = json.loads((output / MERGE_REPORT).read_text())
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict):
        return f"--output_dir {output} exists and is not an earlier merge; choose a new or empty folder."
    written = report.get("files")
    if isinstance(written, list):
        extra = sorted({p.name for p in output.iterdir()} - set(written))
        if extra:
            return (f"--output_dir {output} is an earlier merge that now also holds {', '.join(extra[:5])}, which "
                    "the merge did not write and would delete; move them away or choose another folder.")
    return None


def _clear_leftovers(output: Path) -> None:
    """Staging and replaced folders of interrupted merges into the same target. Only called while holding the
    target's lock, so none of them belongs to a merge still running."""
    for pattern in (f".{output.name}.partial-*", f".{output.name}.replaced-*"):
        for stale in output.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _read_base_config(base_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise MergeError(f"{base_dir / 'config.json'}: missing or not valid JSON; re-download the base model.") \
            from None
    if not isinstance(config, dict):
        raise MergeError(f"{base_dir / 'config.json'}: not a JSON object; re-download the base model.")
    return config


def _hash_inputs(base: BaseWeights, adapter: Adapter) -> dict[str, Any]:
    return {"base_files": {p.name: sha256_file(p) for p in base.files},
            "adapter_files": {p.name: sha256_file(p) for p in adapter.files}}


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, base_model: str | None = None,
                  dtype: str = "auto", max_shard_size: str = "5GB", verify: str = "auto", device: str = "cpu",
                  qlora_merge_base: str = "original", trust_remote_code: bool = False) -> MergeReport:
    """Merge the LoRA adapter in adapter_dir into its base; write a complete model folder to output_dir."""
    started = time.perf_counter()
    problems = _usage_problems(dtype, verify, device, qlora_merge_base, max_shard_size)
    if problems:
        raise UsageError(problems)
    adapter_dir, output = Path(adapter_dir), Path(output_dir)
    adapter_config = read_adapter_config(adapter_dir)
    base_name = base_model or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise UsageError(f"{adapter_dir / 'adapter_config.json'} names no base model; pass --base_model_name_or_path.")
    inputs = {"--adapter_path": adapter_dir}
    if Path(str(base_name)).expanduser().exists():
        inputs["--base_model_name_or_path"] = Path(str(base_name)).expanduser()
    problem = _output_problem(output, inputs)
    if problem:
        raise UsageError(problem)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FnsftError(f"--output_dir {output}: cannot create {output.parent} ({exc.strerror}).") from None
    with FolderLock(output.parent / f".{output.name}.fnsft.lock", "fnsft merge", output):
        problem = _output_problem(output, inputs)  # again, now that no other merge can be writing it
        if problem:
            raise UsageError(problem)
        _clear_leftovers(output)
        return _merge_locked(adapter_dir, adapter_config, str(base_name), output, started, dtype=dtype,
                             max_shard_size=max_shard_size, verify=verify, device=device,
                             qlora_merge_base=qlora_merge_base, trust_remote_code=trust_remote_code)


def _merge_locked(adapter_dir: Path, adapter_config: dict[str, Any], base_name: str, output: Path, started: float, *,
                  dtype: str, max_shard_size: str, verify: str, device: str, qlora_merge_base: str,
                  trust_remote_code: bool) -> MergeReport:
    base_dir = _resolve_base(base_name, trust_remote_code)
    raw_config = _read_base_config(base_dir)
    if raw_config.get("quantization_config"):
        method = (raw_config["quantization_config"] or {}).get("quant_method", "unknown") \
            if isinstance(raw_config["quantization_config"], dict) else "unknown"
        raise MergeError(f"{base_dir} is a pre-quantized checkpoint ({method}); merging into quantized weights "
                         "loses the adapter. Pass the original 16/32-bit model as --base_model_name_or_path.")
    adapter = read_adapter(adapter_dir, adapter_config)
    base = BaseWeights(base_dir)
    try:
        arch = architecture(base_dir, raw_config, {n: base.info(n).shape for n in base.names()}, adapter.pieces,
                            adapter_config, replaces_tensors=bool(adapter.replacements),
                            quantized_training=declares_quantization(adapter_dir / TRAINING_RECORD),
                            trust_remote_code=trust_remote_code)
        quant = read_training_record(adapter_dir, arch.layers, arch.output_embedding)
        if qlora_merge_base == "dequantized" and quant is None:
            raise UsageError(f"--qlora_merge_base dequantized: {adapter_dir} has no {TRAINING_RECORD} recording a "
                             "4bit/8bit training base; drop the flag to merge into the original weights.")
        resolve_targets(adapter, arch)
        problem = _full_check_problem(base) if verify == "full" else None
        if problem:
            raise UsageError(problem)
    except BaseException:
        base.close()
        raise
    torch_device = torch.device(device)
    hasher = ThreadPoolExecutor(max_workers=1)
    hashes = hasher.submit(_hash_inputs, base, adapter)
    ahead = ThreadPoolExecutor(max_workers=1)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    reference = None
    try:
        plan = build_plan(base, adapter, arch, quant if qlora_merge_base == "dequantized" else None, torch_device)
        if verify in ("auto", "on"):
            from functionalnetworkssft.merge.stream_verify import reference_model

            # Built beside the merge (importing PEFT and building the model on the meta device is a second or
            # more of single-core work that would otherwise follow it). The write creates no modules and changes
            # no warning filters, so the build's global switches (meta init, quiet logging) do not reach it.
            reference = ahead.submit(reference_model, base_dir, adapter_dir, plan.vocab_size, trust_remote_code)
        # One thread: the row blocks are small (measured on 2 cores, 2 GB, whole `fnsft merge --verify off` with the
        # inputs hashed ahead: 3.15 s with one thread against 3.77 s with two; with the hashing beside the write,
        # 4.1 s against 8.5 s beside a busy process).
        with torch_threads(1), _prompt_gil_handover(reference is not None):
            report = write_merged(plan, base, adapter, staging, base_dir, dtype, parse_size(max_shard_size),
                                  torch_device)
        report.base_model, report.adapter_path, report.output_dir = str(base_name), str(adapter_dir), str(output)
        if quant is not None:
            report.qlora = {"quantization": quant.quantization, "merge_base": qlora_merge_base,
                            "quantized_modules": len(quant.modules), "quantized_modules_inferred": quant.inferred,
                            "quant_type": quant.quant_type if quant.quantization == "4bit" else None,
                            "double_quant": quant.double_quant if quant.quantization == "4bit" else None,
                            "blocksize": quant.blocksize if quant.quantization == "4bit" else None}
        report.inputs = hashes.result()
        # The adapter's factors and the plan are done with: the check reads the adapter through PEFT.
        vocab_size = plan.vocab_size
        del plan, adapter
        with torch_threads(idle_cores() if verify != "off" else torch.get_num_threads()):
            report.verification = _maybe_verify(verify, staging, base_dir, adapter_dir, base, vocab_size, quant,
                                                qlora_merge_base, arch.prefix, report, torch_device, trust_remote_code,
                                                reference)
        report.seconds = round(time.perf_counter() - started, 3)
        (staging / MERGE_REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
        if report.verification.get("status") == "failed":
            raise MergeError(f"verification failed, nothing written to {output}: {report.summary()}")
        move_into_place(staging, output)
        return report
    except (OSError, RuntimeError) as exc:
        cause = describe_write_error(exc)
        if cause is None:
            raise
        raise MergeError(f"could not write the merged model: {cause}; nothing was written to {output}.") from None
    finally:
        hasher.shutdown(wait=True)
        ahead.shutdown(wait=True, cancel_futures=True)
        _close_unused_reference(reference)
        base.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _close_unused_reference(reference) -> None:
    """The adapter file a reference model built ahead holds open, when the merge failed before verifying (the check
    closes it itself; closing twice is harmless)."""
    if reference is not None and reference.done() and not reference.cancelled() and reference.exception() is None:
        adapter_file = reference.result()[3]
        if adapter_file is not None:
            adapter_file[0].close()


def _maybe_verify(verify, staging, base_dir, adapter_dir, base, vocab_size, quant, qlora_merge_base, prefix, report,
                  device, trust_remote_code, reference=None) -> dict[str, Any]:
    if verify == "off":
        return {"status": "off"}
    lowest = report.dtype if report.dtype in ("bfloat16", "float16") else "float32"
    dequantized = set(quant.modules) if quant is not None and qlora_merge_base == "dequantized" else set()
    if verify != "full":
        from functionalnetworkssft.merge.stream_verify import stream_verify

        def patch(name: str, value: torch.Tensor) -> torch.Tensor:
            return quant.roundtrip(value) if name.endswith(".weight") and name[:-7] in dequantized else value

        return stream_verify(staging, base_dir, adapter_dir, base=base, output_dtype=lowest,
                             vocab_size=vocab_size, patch=patch if dequantized else None, device=device,
                             trust_remote_code=trust_remote_code,
                             reference=reference.result() if reference is not None else None)
    from functionalnetworkssft.merge.verify import verify_merge

    patches = {f"{module}.weight": quant.roundtrip(base.read(_resolve(base, f"{module}.weight", prefix)))
               for module in dequantized}
    return verify_merge(staging, base_dir, adapter_dir, output_dtype=lowest, vocab_size=vocab_size,
                        patches=patches, device=device, trust_remote_code=trust_remote_code)
