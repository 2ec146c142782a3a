"""Check an exported GGUF against the model it came from, for every architecture the exporter writes.

The file is read back tensor by tensor (dequantized, each layout change undone, a layer's experts unstacked) into the
source model's own architecture, and four checks run:

1. the weights: every tensor in the file equals the source's, rounded or quantized as the writer stored it;
2. the model: its logits on fixed probes are within a tolerance of the source's, with the top-1 token agreeing
   (float rounding for f32; one rounding or quantization of every weight for the others);
3. the tokenizer: rebuilt from the file's metadata by transformers, it tokenizes probe strings as the source's does,
   and the chat template is the source's;
4. the hyperparameters: the file holds the metadata the exporter meant to write.

Reading the file back with the exporter's own inverse layouts proves the file holds what was meant, not that llama.cpp
reads it so: two independent readers check that. transformers' GGUF reader, for the architectures it knows, must
compute what fnsft's reading computes; and where llama-cpp-python is installed, llama.cpp itself runs the file (its
next-token logits and a greedy continuation are compared). The tests compare every family's file with llama.cpp's
own converter.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functionalnetworkssft.errors import FnsftError, first_line
from functionalnetworkssft.verification import probe_inputs, quiet, run_probe

# |logit difference| allowed, relative to the largest source logit (at least 1), and the share of positions whose
# top-1 token must agree. f32 is the same numbers; the others carry one rounding or quantization of every weight.
TOLERANCE = {"f32": (1e-4, 1.0), "f16": (1e-2, 0.97), "bf16": (5e-2, 0.9), "q8_0": (0.1, 0.9), "q4_0": (0.75, 0.4),
             "q4_k_m": (0.75, 0.4), "q5_k_m": (0.4, 0.6), "q6_k": (0.2, 0.8)}
# The k-quants are made by llama.cpp's quantizer, whose rounding the gguf package cannot reproduce: each weight is
# held to a bound on its relative RMS error instead (measured: Q4_K 0.05-0.09 on tiny random models and SmolLM2,
# whose Q6_K fallbacks are smaller), and the logits to a tolerance like q4_0's, q8_0's between them.
K_QUANT_WEIGHT_ERROR = {"q4_k_m": 0.15, "q5_k_m": 0.08, "q6_k": 0.04}
# Architectures transformers' GGUF reader reads as llama.cpp does. It rebuilds Qwen3 without its head_dim, Gemma
# without query_pre_attn_scalar and Mixtral as a dense Llama, and does not read GPT-NeoX, OLMo-2, Granite or SmolLM3.
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "gpt2", "phi3", "falcon")
# Strings whose tokenization must match: scripts, digits, whitespace runs, code, special tokens as text.
TOKENIZER_PROBES = ("Hello, world! How are you today?", "The year 2024 had 366 days; 3.14159 is pi.",
                    "  leading spaces,\ttabs\tand\n\nnewlines\n", "def f(x):\n    return x ** 2  # square",
                    "naïve café, Grüße, 東京, русский, 😀 emoji", "don't won't I'm you're we've they'll she'd")


def verify_gguf(source_dir: Path, gguf_path: Path, outtype: str) -> dict[str, Any]:
    import gguf
    from transformers import AutoModelForCausalLM

    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FnsftError(f"{source_dir}: transformers cannot load the model to check the export against it "
                         f"({first_line(exc)}); its weights do not fit its config.json.") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    probes = probe_inputs(source_dir, vocab)
    device = torch.device("cpu")
    source_runs = [run_probe(model, p, device) for p in probes]
    from functionalnetworkssft.export.write import read_config

    config = read_config(source_dir)
    reader = gguf.GGUFReader(gguf_path)
    weights = _load_file_into(model, source_dir, config, reader, outtype)
    exported_runs = [run_probe(model, p, device) for p in probes]
    del model
    gc.collect()
    independent = _transformers_reads(source_dir, gguf_path, probes, exported_runs)

    relative, min_agreement = TOLERANCE[outtype]
    scale = max(1.0, max(float(logits.abs().max()) for logits, _ in source_runs))
    max_diff = max(float((e - s).abs().max()) for (e, _), (s, _) in zip(exported_runs, source_runs))
    agree = sum(int((e.argmax(-1) == s.argmax(-1)).sum()) for (e, _), (s, _) in zip(exported_runs, source_runs))
    total = sum(len(s) for s, _ in source_runs)
    tokenizer = _tokenizer_check(source_dir, gguf_path, reader)
    texts, source_tokenizer = tokenizer.pop("_texts"), tokenizer.pop("_source_tokenizer")
    metadata = _metadata_mismatches(config, reader)
    tolerance = relative * scale
    result: dict[str, Any] = {
        "outtype": outtype,
        "reader": "fnsft (file tensors read back into the source architecture)",
        **weights,
        "max_abs_logit_diff": max_diff,
        "tolerance": tolerance,
        "relative_tolerance": relative,
        "top1_agreement": agree / total,
        "min_top1_agreement": min_agreement,
        "greedy_equal": all(e == s for (_, e), (_, s) in zip(exported_runs, source_runs)),
        "probes": len(probes),
        **tokenizer,
        "metadata_mismatches": metadata,
        "transformers_reader": independent,
    }
    passed = (weights["weights_equal_to_rounded_source"] and not weights["parameters_not_in_file"]
              and max_diff <= tolerance and agree / total >= min_agreement and not tokenizer["tokenizer_mismatches"]
              and tokenizer["chat_template_equal"] and not metadata)
    if independent["status"] == "failed":
        passed = False
    accepted = _accepted_tokenizations(source_dir, texts, source_tokenizer)
    result["llama_cpp"] = _llama_cpp(gguf_path, probes, exported_runs, max(tolerance, TOLERANCE["f16"][0] * scale),
                                     texts, accepted)
    if result["llama_cpp"].get("status") == "failed":
        passed = False
    result["status"] = "passed" if passed else "failed"
    return result


@torch.no_grad()
def _load_file_into(model, source_dir: Path, config: dict[str, Any], reader, outtype: str) -> dict[str, Any]:
    """Put every weight the file holds into `model` (in place), and compare each with what the writer meant to
    store: the source tensor, laid out, rounded or quantized as `outtype`, and read back."""
    import gguf

    from functionalnetworkssft.export import architectures as archs
    from functionalnetworkssft.export.write import read_sources, tensor_type
    from functionalnetworkssft.merge.io import BaseWeights
    from functionalnetworkssft.merge.layout import checkpoint_layout

    checkpoint = BaseWeights(source_dir)
    try:
        names = list(checkpoint.names())
        shapes = {name: checkpoint.info(name).shape for name in names}
        plan = archs.plan(archs.architecture(config), config, [(n, shapes[n]) for n in names])
        layout = checkpoint_layout(model, shapes)
        parameters = dict(model.named_parameters())
        prefix = getattr(model, "base_model_prefix", "") or ""
        owner = _owners(parameters, layout, prefix)
        stored = {t.name: t for t in reader.tensors}
        tied = not any(tensor.gguf_name == "output.weight" for tensor in plan)
        filled: set[str] = set()
        worst, relative, missing_in_file = 0.0, 0.0, []
        for tensor in plan:
            if tensor.gguf_name not in stored:
                missing_in_file.append(tensor.gguf_name)
                continue
            found = stored[tensor.gguf_name]
            data = np.asarray(found.data)
            if found.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = gguf.quants.dequantize(data, found.tensor_type)
            if data.size != int(np.prod(tensor.shape)):  # a file whose tensor is not the model's: no reshape
                worst = relative = float("inf")
                continue
            data = data.astype(np.float32).reshape(tensor.shape)
            expected = np.ascontiguousarray(tensor.layout.forward(read_sources(tensor, checkpoint)), np.float32)
            if outtype in K_QUANT_WEIGHT_ERROR:
                # llama.cpp chose each tensor's type: held to the bound on relative RMS error.
                error = float(np.sqrt(np.mean((data - expected) ** 2) / max(np.mean(expected ** 2), 1e-30)))
                relative = max(relative, error)
            else:
                kind = tensor_type(tensor.gguf_name, tensor.shape, outtype, tied)
                if kind != gguf.GGMLQuantizationType.F32:
                    expected = gguf.quants.dequantize(gguf.quants.quantize(expected, kind), kind).astype(np.float32)
                if found.tensor_type != kind or expected.shape != data.shape:
                    worst = float("inf")
                    continue
                worst = max(worst, float(np.abs(data - expected).max(initial=0.0)))
            if tensor.computed is not None:
                continue
            restored = tensor.layout.inverse(data)
            for index, source in enumerate(tensor.sources):
                value = restored[index] if len(tensor.sources) > 1 else restored
                target = owner.get(source)
                if target is None:
                    continue
                name, piece = target
                destination = parameters[name]
                if piece is None:
                    destination.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(destination.shape))
                else:
                    destination[piece.expert, piece.offset:piece.offset + piece.rows].copy_(torch.from_numpy(value))
                filled.add(name)
        tied_names = set(getattr(model, "all_tied_weights_keys", None) or {})
        not_in_file = sorted(n for n in parameters if n not in filled and n not in tied_names)
        if outtype in K_QUANT_WEIGHT_ERROR:
            bound = K_QUANT_WEIGHT_ERROR[outtype]
            return {"weights_equal_to_rounded_source": relative <= bound and not missing_in_file,
                    "weight_check": f"relative RMS error within {bound} (llama.cpp quantized)",
                    "max_relative_weight_error": relative, "max_abs_weight_diff_vs_rounded_source": 0.0,
                    "tensors_missing_from_file": missing_in_file, "parameters_not_in_file": not_in_file}
        return {"weights_equal_to_rounded_source": worst == 0.0 and not missing_in_file,
                "weight_check": "exact (the source, rounded as stored)",
                "max_abs_weight_diff_vs_rounded_source": worst, "tensors_missing_from_file": missing_in_file,
                "parameters_not_in_file": not_in_file}
    finally:
        checkpoint.close()


def _transformers_reads(source_dir: Path, gguf_path: Path, probes, exported_runs) -> dict[str, Any]:
    """transformers' own GGUF reader, where it knows the architecture: an independent reading of the file's
    layouts and hyperparameters, which must compute what fnsft's reading computes (within float rounding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers' reader fixes GPT-2's position table at 1,024 rows and drops rope scaling (Llama-3.1's frequency
    # factors) whatever the file says, so such files are read with the source's config: their tensors still come
    # from the file.
    config = AutoConfig.from_pretrained(source_dir)
    if config.model_type not in TRANSFORMERS_READS:
        return {"status": "not run", "why": f"transformers' GGUF reader does not read {config.model_type} files as "
                                            "llama.cpp does"}
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scaled = isinstance(parameters, dict) and parameters.get("rope_type", parameters.get("type", "default")) \
        not in ("default", None)
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                config=config if config.model_type == "gpt2" or scaled else None).eval()
    except Exception as exc:  # an architecture or layout transformers does not read: said, not failed
        return {"status": "not run", "why": f"transformers cannot read this file ({str(exc).splitlines()[0][:160]})"}
    runs = [run_probe(model, p, torch.device("cpu")) for p in probes]
    del model
    gc.collect()
    scale = max(1.0, max(float(logits.abs().max()) for logits, _ in exported_runs))
    diff = max(float((a - b).abs().max()) for (a, _), (b, _) in zip(runs, exported_runs))
    tolerance = TOLERANCE["f32"][0] * scale
    return {"status": "passed" if diff <= tolerance else "failed", "max_abs_logit_diff": diff,
            "tolerance": tolerance}


def _owners(parameters: dict[str, torch.Tensor], layout, prefix: str) -> dict[str, tuple[str, Any]]:
    """Checkpoint tensor -> (model parameter, its piece when the parameter is built from several)."""
    owners: dict[str, tuple[str, Any]] = {}
    for name in parameters:
        if name in layout.fused:
            for piece in layout.fused[name]:
                owners[piece.disk] = (name, piece)
            continue
        disk = layout.disk(name)
        for candidate in (disk, disk.removeprefix(prefix + ".") if prefix else disk, f"{prefix}.{disk}"):
            owners.setdefault(candidate, (name, None))
    return owners


def _tokenizer_check(source_dir: Path, gguf_path: Path, reader) -> dict[str, Any]:
    """The file's tokenizer as transformers rebuilds it from the metadata alone, against the source's."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = AutoTokenizer.from_pretrained(source_dir)
    with quiet():
        rebuilt = PreTrainedTokenizerFast(gguf_file=gguf_path.name, name_or_path=str(gguf_path.parent))
    _apply_llama_cpp_pre_tokenizer(rebuilt, reader)
    texts = list(TOKENIZER_PROBES) + [t for t in source.all_special_tokens if t][:4]
    mismatched = [text for text in texts if source(text, add_special_tokens=True)["input_ids"]
                  != rebuilt(text, add_special_tokens=True)["input_ids"]]
    return {"tokenizer_probes": len(texts), "tokenizer_mismatches": mismatched,
            "chat_template_equal": getattr(source, "chat_template", None) == getattr(rebuilt, "chat_template", None),
            "_texts": texts, "_source_tokenizer": source}


def _metadata_mismatches(config: dict[str, Any], reader) -> list[str]:
    """Hyperparameter keys whose value in the file is not what the exporter writes for this config."""
    import gguf

    from functionalnetworkssft.export import architectures as archs

    arch = archs.architecture(config)
    intended = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    archs.add_metadata(intended, arch, config)
    mismatched = []
    for key, value in intended.kv_data[0].items():
        found = reader.get_field(key)
        if found is None:
            mismatched.append(f"{key} missing")
            continue
        got = found.contents()
        want = value.value
        if isinstance(want, float):
            if not np.isclose(np.float32(got), np.float32(want)):
                mismatched.append(f"{key}: {got} (expected {want})")
        elif got != want:
            mismatched.append(f"{key}: {got!r} (expected {want!r})")
    return mismatched


def _accepted_tokenizations(source_dir: Path, texts: list[str], source_tokenizer) -> list[set[tuple[int, ...]]]:
    """For each text, the token ids the model's tokenizer gives. A SentencePiece model's own library is the
    reference llama.cpp follows, and transformers' fast conversion of it differs on leading spaces (sentencepiece and
    llama.cpp put one more "▁" before "  text"): its ids are accepted too."""
    accepted = [{tuple(source_tokenizer(text, add_special_tokens=True)["input_ids"])} for text in texts]
    model = source_dir / "tokenizer.model"
    if model.is_file():
        try:
            from sentencepiece import SentencePieceProcessor

            processor = SentencePieceProcessor(model_file=str(model))
        except (ImportError, OSError, RuntimeError):
            return accepted
        bos = [source_tokenizer.bos_token_id] if source_tokenizer("a")["input_ids"][:1] == \
            [source_tokenizer.bos_token_id] else []
        for ids, text in zip(accepted, texts):
            ids.add(tuple(bos + processor.encode(text)))
    return accepted


def _llama_cpp(gguf_path: Path, probes, expected_runs, tolerance: float, texts, accepted) -> dict[str, Any]:
    """llama.cpp's own logits and greedy tokens for the file, against the model as the file stores it. llama.cpp keeps
    its attention cache in f16, so even an f32 file is held to the f16 tolerance."""
    from functionalnetworkssft.export import llama_cpp

    if not llama_cpp.available():
        return {"status": "not run",
                "why": "llama-cpp-python is not installed (pip install 'functionalnetworkssft[gguf]')"}
    outcome = llama_cpp.run(gguf_path, probes, len(expected_runs[0][1]), list(texts))
    if isinstance(outcome, llama_cpp.Refused):
        return {"status": "failed", "why": outcome}
    if isinstance(outcome, str):
        # The checker could not run (a crash is about the llama.cpp build, not the file): said, not failed.
        return {"status": "not run", "why": outcome}
    logits, greedy, tokens = outcome
    mismatched = [text for text, got, ok in zip(texts, tokens, accepted) if tuple(got) not in ok]
    max_diff = agree = total = 0
    for got, (expected, _) in zip(logits, expected_runs):
        reference = expected.numpy()[:, : got.shape[1]]
        max_diff = max(max_diff, float(abs(got - reference).max()))
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        total += len(reference)
    greedy_equal = greedy == [tokens for _, tokens in expected_runs]
    # llama.cpp computes in its own order (and f16/quantized dot products), so it is held to the tolerance of the
    # comparison with the unrounded model (at least f16's), and its top-1 tokens must agree.
    passed = max_diff <= tolerance and agree / total >= 0.9 and not mismatched
    return {"status": "passed" if passed else "failed", "max_abs_logit_diff": max_diff,
            "top1_agreement": agree / total, "greedy_equal": greedy_equal, "tokenizer_mismatches": mismatched}


def _apply_llama_cpp_pre_tokenizer(tokenizer, reader) -> None:
    """transformers rebuilds a "smollm" file's tokenizer with plain ByteLevel splitting, while llama.cpp splits
    digits first for that name; the check uses llama.cpp's rule, which is what the file means."""
    from tokenizers import pre_tokenizers

    field = reader.get_field("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
