"""`fnsft export-gguf MODEL_DIR --outfile FILE.gguf`: the export from start to end. Check the flags and the model,
hold the target, write the file under a hidden staging name, verify it, rename it into place, write the Modelfile
and the report beside it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from functionalnetworkssft import __version__
from functionalnetworkssft.errors import FnsftError, UsageError, describe_write_error
from functionalnetworkssft.export import llama_cpp
from functionalnetworkssft.export.architectures import UnsupportedModel
from functionalnetworkssft.export.modelfile import end_tokens, is_ours, write_modelfile
from functionalnetworkssft.export.write import K_QUANTS, OUTTYPES, write_gguf
from functionalnetworkssft.options import Options, arg, field_problems, parse
from functionalnetworkssft.outputs import FolderLock, writable_problem, write_text_atomic


class ExportError(FnsftError):
    """The model could not be exported, or the exported file does not compute what the model computes."""


@dataclass
class ExportConfig(Options):
    """Export a transformers model folder (merged_model/, or a full fine-tune) to one GGUF file for llama.cpp and
    Ollama, streamed a tensor at a time and verified by loading it back."""

    model_dir: str = arg("Model folder to export (config.json, safetensors weights, tokenizer). May be given as the "
                         "first positional argument.")
    outfile: str = arg("GGUF file to write; FILE.gguf.json (the report) and an Ollama Modelfile are written beside "
                       "it.")
    outtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = arg(
        "Type of the weight matrices (norms, biases and vectors stay f32; a matrix whose rows are not a multiple of "
        "32 falls back to f16 for the quantized types). The k-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's "
        "quantizer, which llama-cpp-python provides.", default="f16")
    verify: Literal["on", "off"] = arg("Load the file back and compare its logits and tokenization with the model's.",
                                       default="on")


def main(argv: list[str] | None, prog: str = "fnsft export-gguf") -> None:
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv[0], *argv[1:]]
    cfg = parse(ExportConfig, argv, prog)
    problems = field_problems(cfg)
    if problems:
        raise UsageError(problems)
    result = export_gguf(cfg.model_dir, cfg.outfile, outtype=cfg.outtype, verify=cfg.verify == "on")
    print(result["summary"])


def export_gguf(model_dir: str | Path, outfile: str | Path, *, outtype: str = "f16", verify: bool = True,
                name: str | None = None) -> dict[str, Any]:
    """Export model_dir to outfile; returns the report (also written to outfile + '.json')."""
    started = time.perf_counter()
    model_dir, outfile = Path(model_dir).expanduser(), Path(outfile).expanduser()
    problems = _usage_problems(model_dir, outfile, outtype)
    if problems:
        raise UsageError(problems)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(outfile.parent / f".{outfile.name}.fnsft.lock", "fnsft export-gguf", outfile):
        _clear_leftovers(outfile)
        return _export_locked(model_dir, outfile, outtype, verify, name or model_dir.resolve().name, started)


def _usage_problems(model_dir: Path, outfile: Path, outtype: str) -> list[str]:
    problems = []
    if outtype not in OUTTYPES and outtype not in K_QUANTS:
        problems.append(f"--outtype {outtype}: choose one of {', '.join([*OUTTYPES, *K_QUANTS])}.")
    elif outtype in K_QUANTS and not llama_cpp.available():
        problems.append(f"--outtype {outtype}: the gguf package cannot write k-quants; install llama.cpp's quantizer "
                        "(pip install 'functionalnetworkssft[gguf]'), or export --outtype f16 and run llama.cpp's "
                        f"llama-quantize FILE-f16.gguf FILE-{outtype}.gguf {outtype.upper()}.")
    if not (model_dir / "config.json").is_file():
        problems.append(f"--model_dir {model_dir}: not a model folder (no config.json); point at merged_model/ or a "
                        "fully fine-tuned model folder.")
    elif quantized := _quantized(model_dir):
        problems.append(f"--model_dir {model_dir}: holds quantized weights ({quantized}); export the "
                        "16/32-bit model (merged_model/ is always saved in the base's own dtype).")
    elif (model_dir / "adapter_config.json").is_file() and not any(model_dir.glob("model*.safetensors")):
        problems.append(f"--model_dir {model_dir}: holds an adapter, not a model; merge it first (fnsft merge) and "
                        "export merged_model/.")
    if outfile.is_file() and not _written_by_us(outfile):
        problems.append(f"--outfile {outfile}: exists and was not written by fnsft export-gguf (no {outfile.name}.json "
                        "report beside it); remove it or choose another name.")
    report = outfile.with_name(outfile.name + ".json")
    if not outfile.is_file() and os.path.lexists(report) and not _written_by_us(outfile):
        problems.append(f"--outfile {outfile}: {report} exists and was not written by fnsft export-gguf; move it or "
                        "choose another name.")
    modelfile = outfile.parent / "Modelfile"
    if modelfile.is_file() and not is_ours(modelfile):
        problems.append(f"--outfile {outfile}: {modelfile} exists and was not written by fnsft export-gguf; move it "
                        "or export into another folder.")
    if any(ord(char) < 32 or ord(char) == 127 for char in outfile.name):
        problems.append(f"--outfile {outfile!r}: the name holds a line break or control character, which the "
                        "Modelfile beside it cannot hold (each of its lines is one instruction); rename it.")
    elif outfile.suffix != ".gguf":
        problems.append(f"--outfile {outfile}: name it FILE.gguf.")
    elif outfile.is_dir():
        problems.append(f"--outfile {outfile}: is a folder; name a file.")
    else:
        problem = writable_problem(outfile.parent, "--outfile")
        if problem:
            problems.append(problem)
    return problems


def _quantized(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not quant:
        return None
    return str(quant.get("quant_method", "unknown method")) if isinstance(quant, dict) else "unknown method"


def _written_by_us(outfile: Path) -> bool:
    path = outfile.with_name(outfile.name + ".json")
    if not path.is_file():  # a folder, or a FIFO that a read would wait on forever
        return False
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "fnsft_version" in report and report.get("outfile") == outfile.name


def _clear_leftovers(outfile: Path) -> None:
    """Staging files of exports that were killed (we hold the lock, so no export is writing them now)."""
    for stale in outfile.parent.glob(f".{outfile.name}.*.partial"):
        stale.unlink(missing_ok=True)


def _export_locked(model_dir: Path, outfile: Path, outtype: str, verify: bool, name: str,
                   started: float) -> dict[str, Any]:
    from tqdm.auto import tqdm

    staging = outfile.with_name(f".{outfile.name}.{os.getpid()}.partial")
    try:
        with tqdm(desc="Writing GGUF", unit="tensor", leave=False, disable=None) as progress:
            if outtype in K_QUANTS:
                written = _k_quant(model_dir, staging, outtype, name, progress)
            else:
                written = write_gguf(model_dir, staging, outtype, name, progress)
    except (UnsupportedModel, ExportError):
        staging.unlink(missing_ok=True)
        raise
    except BaseException as exc:
        staging.unlink(missing_ok=True)
        cause = describe_write_error(exc)
        if cause:
            raise ExportError(f"could not write {outfile}: {cause}.") from None
        raise
    template = written.tokenizer.pop("chat_template_text", None)
    written.tokenizer["chat_template"] = template is not None
    report: dict[str, Any] = {
        "fnsft_version": __version__, "source": str(model_dir), "outfile": outfile.name, "outtype": outtype,
        "architecture": written.architecture, "tensors": written.tensors, "bytes": written.bytes,
        "tensor_types": written.types, "f16_fallbacks": written.fallbacks, "tokenizer": written.tokenizer,
    }
    if verify:
        from functionalnetworkssft.export.verify import verify_gguf

        report["write_seconds"] = round(time.perf_counter() - started, 1)
        try:
            report["verification"] = verify_gguf(model_dir, staging, outtype)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    else:
        report["verification"] = {"status": "skipped"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    status = report["verification"]["status"]
    if status == "failed":
        rejected = outfile.with_name(outfile.name + ".rejected")
        os.replace(staging, rejected)
        _write_json(outfile.with_name(outfile.name + ".json"), report)
        raise ExportError(f"the exported file does not compute what {model_dir} computes with its weights stored "
                          f"as {outtype} ({_failures(report['verification'])}); kept as {rejected.name} for "
                          f"inspection, details in {outfile.name}.json.")
    os.replace(staging, outfile)
    report["modelfile"] = write_modelfile(outfile.parent / "Modelfile", outfile.name, template, end_tokens(model_dir))
    _write_json(outfile.with_name(outfile.name + ".json"), report)
    report["summary"] = _summary(outfile, report)
    return report


def _k_quant(model_dir: Path, staging: Path, outtype: str, name: str, progress):
    """An f16 file first, then llama.cpp's quantizer into the staging file; the f16 file is removed either way."""
    import gguf

    f16 = staging.with_name(staging.name.removesuffix(".partial") + ".f16.partial")
    try:
        written = write_gguf(model_dir, f16, "f16", name, progress)
        failure = llama_cpp.quantize(f16, staging, K_QUANTS[outtype])
        if failure:
            raise ExportError(f"--outtype {outtype}: {failure}.")
    finally:
        f16.unlink(missing_ok=True)
    written.path, written.bytes, written.fallbacks = staging, staging.stat().st_size, []
    written.types = {}
    for tensor in gguf.GGUFReader(staging).tensors:
        written.types[tensor.tensor_type.name] = written.types.get(tensor.tensor_type.name, 0) + 1
    return written


def _write_json(path: Path, report: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps({k: v for k, v in report.items() if k != "summary"}, indent=1) + "\n")


def _summary(outfile: Path, report: dict[str, Any]) -> str:
    check = report["verification"]
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(report["tensor_types"].items()))
    line = (f"exported {report['tensors']} tensors ({types}) -> {outfile} ({report['bytes'] / 1e9:.2f} GB) in "
            f"{report['seconds']} s")
    if check["status"] == "skipped":
        return line + "; not verified (--verify off)."
    llama = check.get("llama_cpp", {})
    return (f"{line}; verification passed: every weight is the model's stored as {report['outtype']} "
            f"({check['weight_check']}), the file's "
            f"logits are within {check['max_abs_logit_diff']:.3g} of the model's (tolerance {check['tolerance']:.3g}), "
            f"top-1 agreement {check['top1_agreement']:.1%}; tokenizer equal on {check['tokenizer_probes']} probes; "
            f"llama.cpp: {llama.get('status', 'not run')}. Modelfile: {report['modelfile']}.")


def _failures(check: dict[str, Any]) -> str:
    """What the verification found wrong, in a few words each."""
    found = []
    if not check["weights_equal_to_rounded_source"] or check["parameters_not_in_file"]:
        found.append((f"weights' relative error up to {check['max_relative_weight_error']:.3g}"
                      if "max_relative_weight_error" in check else
                      f"weights differ from the model's by up to {check['max_abs_weight_diff_vs_rounded_source']:.3g}")
                     + (f", {len(check['parameters_not_in_file'])} parameter(s) not in the file"
                        if check["parameters_not_in_file"] else ""))
    if check["max_abs_logit_diff"] > check["tolerance"] or check["top1_agreement"] < check["min_top1_agreement"]:
        found.append(f"max |logit diff| {check['max_abs_logit_diff']:.3g}, tolerance {check['tolerance']:.3g}, "
                     f"top-1 agreement {check['top1_agreement']:.1%}")
    if check["tokenizer_mismatches"] or not check["chat_template_equal"]:
        found.append(f"tokenizer mismatches: {len(check['tokenizer_mismatches'])}"
                     + ("" if check["chat_template_equal"] else ", chat template differs"))
    if check["metadata_mismatches"]:
        found.append(f"metadata: {', '.join(check['metadata_mismatches'][:3])}")
    if check.get("llama_cpp", {}).get("status") == "failed":
        found.append("llama.cpp computes otherwise")
    return "; ".join(found) or "see the report"
