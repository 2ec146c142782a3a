"""Check an exported GGUF against the model it came from.

transformers reads the file back (dequantizing it), and the two models' logits on fixed probes are compared: within
float rounding for f32, within a tolerance and a top-1 agreement for the lossy types. The GGUF's own tokenizer,
rebuilt from its metadata, must tokenize probe strings exactly as the source tokenizer does. Where llama-cpp-python
is installed, llama.cpp itself runs the file too: its next-token logits and a greedy continuation are compared.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from functionalnetworkssft.verification import probe_inputs, quiet, run_probe

# |logit difference| allowed, relative to the largest source logit (at least 1), and the share of positions whose
# top-1 token must agree. f32 is the same numbers; the others carry one rounding or quantization of every weight.
TOLERANCE = {"f32": (1e-4, 1.0), "f16": (1e-2, 0.97), "bf16": (5e-2, 0.9), "q8_0": (0.1, 0.9), "q4_0": (0.75, 0.4)}
# Strings whose tokenization must match: scripts, digits, whitespace runs, code, special tokens as text.
TOKENIZER_PROBES = ("Hello, world! How are you today?", "The year 2024 had 366 days; 3.14159 is pi.",
                    "  leading spaces,\ttabs\tand\n\nnewlines\n", "def f(x):\n    return x ** 2  # square",
                    "naïve café, Grüße, 東京, русский, 😀 emoji", "don't won't I'm you're we've they'll she'd")


def verify_gguf(source_dir: Path, gguf_path: Path, outtype: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet():
        source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    vocab = source.get_input_embeddings().weight.shape[0]
    probes = probe_inputs(source_dir, vocab)
    device = torch.device("cpu")
    source_runs = [run_probe(source, p, device) for p in probes]
    # The model the file should hold exactly: every weight rounded (or quantized) as the writer stored it.
    _round_trip(source, source_dir, outtype)
    expected_runs = [run_probe(source, p, device) for p in probes]
    del source
    gc.collect()
    # transformers' GGUF reader fixes GPT-2's position table at 1,024 rows and drops rope scaling (Llama-3.1's
    # frequency factors) whatever the file says, so such files are read with the source's config: their tensors
    # still come from the file, and llama.cpp, where installed, reads their metadata.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_dir)
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scaled = isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default"
    config = config if config.model_type == "gpt2" or scaled else None
    with quiet():
        exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config,
                                                        dtype=torch.float32).eval()
    exported_runs = [run_probe(exported, p, device) for p in probes]
    del exported
    gc.collect()

    relative, min_agreement = TOLERANCE[outtype]
    scale = max(1.0, max(float(logits.abs().max()) for logits, _ in source_runs))
    exact_diff = max(float((e - x).abs().max()) for (e, _), (x, _) in zip(exported_runs, expected_runs))
    exact_tolerance = TOLERANCE["f32"][0] * scale
    exact_greedy = all(e == x for (_, e), (_, x) in zip(exported_runs, expected_runs))
    max_diff = max(float((e - s).abs().max()) for (e, _), (s, _) in zip(exported_runs, source_runs))
    agree = sum(int((e.argmax(-1) == s.argmax(-1)).sum()) for (e, _), (s, _) in zip(exported_runs, source_runs))
    total = sum(len(s) for s, _ in source_runs)
    greedy_equal = [e == s for (_, e), (_, s) in zip(exported_runs, source_runs)]

    source_tokenizer = AutoTokenizer.from_pretrained(source_dir)
    with quiet():
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _apply_llama_cpp_pre_tokenizer(gguf_tokenizer, gguf_path)
    texts = list(TOKENIZER_PROBES) + [t for t in source_tokenizer.all_special_tokens if t][:4]
    mismatched = [text for text in texts if source_tokenizer(text, add_special_tokens=True)["input_ids"]
                  != gguf_tokenizer(text, add_special_tokens=True)["input_ids"]]
    template_equal = getattr(source_tokenizer, "chat_template", None) == getattr(gguf_tokenizer, "chat_template",
                                                                                  None)
    tolerance = relative * scale
    result: dict[str, Any] = {
        "outtype": outtype,
        "max_abs_logit_diff_vs_rounded_source": exact_diff,
        "rounded_source_tolerance": exact_tolerance,
        "greedy_equal_to_rounded_source": exact_greedy,
        "max_abs_logit_diff": max_diff,
        "tolerance": tolerance,
        "relative_tolerance": relative,
        "top1_agreement": agree / total,
        "min_top1_agreement": min_agreement,
        "greedy_equal": all(greedy_equal),
        "probes": len(probes),
        "tokenizer_probes": len(texts),
        "tokenizer_mismatches": mismatched,
        "chat_template_equal": template_equal,
    }
    passed = (exact_diff <= exact_tolerance and exact_greedy and max_diff <= tolerance
              and agree / total >= min_agreement and not mismatched and template_equal)
    result["llama_cpp"] = _llama_cpp(gguf_path, probes, expected_runs, tolerance, texts, source_tokenizer)
    if result["llama_cpp"].get("status") == "failed":
        passed = False
    result["status"] = "passed" if passed else "failed"
    return result


def _llama_cpp(gguf_path: Path, probes, expected_runs, tolerance: float, texts, source_tokenizer) -> dict[str, Any]:
    """llama.cpp's own logits and greedy tokens for the file, against the model as the file stores it."""
    from functionalnetworkssft.export import llama_cpp

    if not llama_cpp.available():
        return {"status": "not run",
                "why": "llama-cpp-python is not installed (pip install 'functionalnetworkssft[gguf]')"}
    outcome = llama_cpp.run(gguf_path, probes, len(expected_runs[0][1]), list(texts))
    if isinstance(outcome, str):
        # The checker could not run (a crash is about the llama.cpp build, not the file): said, not failed.
        return {"status": "not run", "why": outcome}
    logits, greedy, tokens = outcome
    mismatched = [text for text, got in zip(texts, tokens)
                  if got != source_tokenizer(text, add_special_tokens=True)["input_ids"]]
    max_diff = agree = total = 0
    for got, (expected, _) in zip(logits, expected_runs):
        reference = expected.numpy()[:, : got.shape[1]]
        max_diff = max(max_diff, float(abs(got - reference).max()))
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        total += len(reference)
    greedy_equal = greedy == [tokens for _, tokens in expected_runs]
    # llama.cpp computes in its own order (and f16/quantized dot products), so it is held to the tolerance of the
    # comparison with the unrounded model, and its top-1 tokens must agree where the file's model is decisive.
    passed = max_diff <= tolerance and agree / total >= 0.9 and not mismatched
    return {"status": "passed" if passed else "failed", "max_abs_logit_diff": max_diff,
            "top1_agreement": agree / total, "greedy_equal": greedy_equal, "tokenizer_mismatches": mismatched}


@torch.no_grad()
def _round_trip(model, source_dir: Path, outtype: str) -> None:
    """Replace each weight of `model` by what the GGUF stores for it (cast or quantized, then read back), so that
    the exported file can be held to float rounding whatever its type."""
    import gguf
    import numpy as np

    from functionalnetworkssft.export import arch as archs
    from functionalnetworkssft.export.write import read_config, tensor_type

    config = read_config(source_dir)
    parameters = dict(model.named_parameters())
    plan = archs.tensors(archs.architecture(config), config,
                         [(name, tuple(p.shape)) for name, p in parameters.items()])
    tied = not any(t.gguf_name == "output.weight" for t in plan)
    for tensor in plan:
        kind = tensor_type(tensor.gguf_name, tensor.shape, outtype, tied)
        if tensor.source not in parameters or kind == gguf.GGMLQuantizationType.F32:
            continue
        weight = parameters[tensor.source]
        # Quantization blocks run along rows. GPT-2's transpose changes which axis that is, so it is applied and
        # undone; q/k permutations move whole rows, so rounding the weights unpermuted gives the same values.
        transposed = tensor.transform is np.transpose
        stored = weight.detach().float().numpy()
        stored = np.ascontiguousarray(stored.T if transposed else stored, dtype=np.float32)
        restored = gguf.quants.dequantize(gguf.quants.quantize(stored, kind), kind)
        weight.copy_(torch.from_numpy(np.ascontiguousarray(restored.T if transposed else restored)))


def _apply_llama_cpp_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """transformers rebuilds a "smollm" file's tokenizer with plain ByteLevel splitting, while llama.cpp splits
    digits first for that name; the check uses llama.cpp's rule, which is what the file means."""
    import gguf
    from tokenizers import pre_tokenizers

    field = gguf.GGUFReader(gguf_path).get_field("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
