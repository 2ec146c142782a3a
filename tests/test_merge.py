"""The streaming merge engine: exact parity with PEFT for every LoRA variant, a complete and safe output folder."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_llama
from functionalnetworkssft.errors import MergeError, UsageError
from functionalnetworkssft.merge import merge_adapter
from functionalnetworkssft.merge.io import BLOCK_ELEMENTS

warnings.filterwarnings("ignore")


def make_adapter(base: Path, out: Path, *, seed: int = 1, resize: int | None = None, tokenizer_from: Path | None = None,
                 **lora) -> Path:
    """A PEFT adapter with random, non-zero weights everywhere (B, magnitudes, biases, token rows)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    saved = load_file(adapter / "adapter_model.safetensors")
    embed = [t for k, t in saved.items() if k.endswith(("embed_tokens.weight", "wte.weight"))]
    if embed and embed[0].shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(embed[0].shape[0], mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter).eval()


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def logits(model, ids=tuple(range(3, 40))) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


def load_merged(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


VARIANTS = {
    "lora": ("tiny_llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": ("tiny_llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "dora": ("tiny_llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"])),
    "rank_alpha_pattern": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"],
                                              rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 6},
                                              alpha_pattern={"gate_proj": 3})),
    "layers_to_transform": ("tiny_llama", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               layers_to_transform=[1], layers_pattern="layers")),
    "embedding_lora": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": ("tiny_llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])),
    "modules_to_save": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           modules_to_save=["lm_head", "embed_tokens"])),
    "trainable_tokens": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            trainable_token_indices=[1, 2, 7])),
    "gpt2_conv1d_fan_in_fan_out": ("tiny_gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                     target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_lora_bias": ("tiny_gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                                         target_modules=["c_attn", "c_fc"])),
    "gpt2_dora": ("tiny_gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                    target_modules=["c_attn"])),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_lora_variant_matches_peft_merge_and_unload(variant, request, tmp_path):
    fixture, lora = VARIANTS[variant]
    base = request.getfixturevalue(fixture)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(base), verify="off")

    reference = peft_model(base, adapter)
    expected_logits = logits(reference)
    expected = reference.merge_and_unload().state_dict()
    got = merged_state(tmp_path / "merged")
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert report.lora_modules > 0 or variant == "trainable_tokens"
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), expected_logits, atol=1e-4, rtol=0)


# Variants whose architecture the files settle (untied Llama, LoRA on matrices). The others need the model's code:
# Conv1D, tokens and saved tensors (PEFT saves a LoRA-targeted embedding's base weight with the adapter).
FROM_FILES = {"lora", "rslora", "dora", "rank_alpha_pattern", "layers_to_transform"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_files_answer_what_transformers_answers_or_nothing(variant, request, tmp_path):
    from functionalnetworkssft.merge.adapter import read_adapter, read_adapter_config
    from functionalnetworkssft.merge.architecture import from_files, from_transformers
    from functionalnetworkssft.merge.io import BaseWeights

    fixture, lora = VARIANTS[variant]
    base_dir = request.getfixturevalue(fixture)
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", **lora)
    adapter_config = read_adapter_config(adapter_dir)
    adapter = read_adapter(adapter_dir, adapter_config)
    base = BaseWeights(base_dir)
    shapes = {n: base.info(n).shape for n in base.names()}
    base.close()
    raw = json.loads((base_dir / "config.json").read_text())
    known = from_files(raw, shapes, adapter.pieces, adapter_config) if not adapter.replacements else None
    model = from_transformers(base_dir, trust_remote_code=False)
    assert (known is not None) == (variant in FROM_FILES)
    if known is not None:
        assert set(known.layers) == set(adapter.pieces)
        assert {n: model.layers[n] for n in adapter.pieces} == known.layers
        assert (known.vocab_size, known.tie_word_embeddings) == (model.vocab_size, model.tie_word_embeddings)


def test_a_verify_off_merge_of_a_plain_model_never_imports_model_code(tiny_llama, tmp_path):
    """The architecture comes from the files, so the merge is not held up by importing transformers' models."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    code = ("import sys; from functionalnetworkssft.merge import merge_adapter; "
            "merge_adapter(sys.argv[1], sys.argv[2], base_model=sys.argv[3], verify='off'); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code, str(adapter), str(tmp_path / "merged"), str(tiny_llama)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_fingerprints_hashed_ahead_are_those_of_the_files_merged(tiny_llama, tmp_path):
    """`fnsft merge` hashes its inputs while torch loads; a file rewritten after that is hashed again."""
    from safetensors.torch import save_file

    from functionalnetworkssft.cli import main
    from functionalnetworkssft.merge import inputs

    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    inputs.hash_inputs_ahead(adapter, str(base))
    stale = inputs.sha256_file(base / "model.safetensors")
    state = load_file(base / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1.0  # same size, other bytes
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert main(["merge", "--adapter_path", str(adapter), "--base_model_name_or_path", str(base),
                 "--output_dir", str(tmp_path / "merged"), "--verify", "off"]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    fresh = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert report["inputs"]["base_files"] == {"model.safetensors": fresh} and fresh != stale
    for name, digest in report["inputs"]["adapter_files"].items():
        assert digest == hashlib.sha256((adapter / name).read_bytes()).hexdigest()


def test_resized_vocabulary_updates_embeddings_and_vocab_size(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", resize=336, r=4, lora_alpha=8,
                           target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="off")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    state = merged_state(tmp_path / "merged")
    assert config["vocab_size"] == 336
    assert state["model.embed_tokens.weight"].shape == (336, 32) and state["lm_head.weight"].shape == (336, 32)
    reference = peft_model(tiny_llama, adapter)
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids=range(300, 336)),
                               logits(reference, ids=range(300, 336)), atol=1e-4, rtol=0)


def test_bf16_base_stays_bf16_within_one_rounding(tiny_llama_bf16, tmp_path):
    adapter = make_adapter(tiny_llama_bf16, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama_bf16), verify="on")
    got = merged_state(tmp_path / "merged")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in got  # still tied: the adapter did not touch the embeddings
    # Exact arithmetic is float32 on the bf16 values, rounded once; PEFT rounds each intermediate step to bf16.
    exact = peft_model(tiny_llama_bf16, adapter, dtype=torch.float32).merge_and_unload().state_dict()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor.float(), exact[name].to(torch.bfloat16).float(), atol=0, rtol=2 ** -8)
    peft_bf16 = peft_model(tiny_llama_bf16, adapter, dtype=torch.bfloat16).merge_and_unload().state_dict()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor.float(), peft_bf16[name].float(), atol=1e-3, rtol=2 ** -6)
    assert report.verified is True and report.verification["output_dtype"] == "bfloat16"


def test_lora_on_tied_embedding_unties_and_computes_what_base_plus_adapter_computed(tiny_llama_tied, tmp_path):
    adapter = make_adapter(tiny_llama_tied, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["embed_tokens", "q_proj"])
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama_tied), verify="on")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    state = merged_state(tmp_path / "merged")
    assert config["tie_word_embeddings"] is False
    assert torch.equal(state["lm_head.weight"], load_file(tiny_llama_tied / "model.safetensors")["model.embed_tokens.weight"])
    reference = peft_model(tiny_llama_tied, adapter)
    expected = logits(reference)
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), expected, atol=1e-4, rtol=0)
    # PEFT's own merge adds the delta to the shared tensor and so changes the output head too.
    assert (logits(reference.merge_and_unload()) - expected).abs().max() > 1e-2
    assert report.verified is True


def test_trainable_tokens_on_tied_embeddings_stay_tied(tiny_llama_tied, tmp_path):
    adapter = make_adapter(tiny_llama_tied, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"],
                           trainable_token_indices=[3, 5])
    merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama_tied), verify="off")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in merged_state(tmp_path / "merged")
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), logits(peft_model(tiny_llama_tied, adapter)),
                               atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tiny_llama) -> Path:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / name, folder / name)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def test_sharded_base_gives_sharded_output_with_byte_exact_index(sharded_llama, tmp_path):
    adapter = make_adapter(sharded_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(sharded_llama), verify="off",
                           max_shard_size="60KB")
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == report.shards > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    state = merged_state(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state)
    torch.testing.assert_close(logits(load_merged(out)), logits(peft_model(sharded_llama, adapter)), atol=1e-4, rtol=0)


def test_output_folder_is_complete_with_training_tokenizer_and_no_adapter_files(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from conftest import CHATML

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"],
                           tokenizer_from=tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tokenizer.add_tokens(["<|tool|>"])  # a token added in training lives only in the adapter's tokenizer
    tokenizer.save_pretrained(adapter)
    (adapter / "fnsft_training.json").write_text(json.dumps({"quantization": None, "quantized_modules": []}))
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="on")
    out = tmp_path / "merged"

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "merge_report.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert not [f for f in files if f.startswith("adapter") or f == "fnsft_training.json"]
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.chat_template == CHATML
    assert "<|tool|>" in merged_tokenizer.get_vocab()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["verification"]["status"] == "passed" and saved["verification"]["max_abs_logit_diff"] < 1e-4
    assert saved["verification"]["top1_agreement"] == 1.0 and saved["verification"]["mode"] == "streaming"
    # Two decoder blocks, the embeddings, the final norm and the output head, each compared as it passes.
    assert [b["block"] for b in saved["verification"]["blocks"]] == [
        "model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert saved["inputs"]["base_files"]["model.safetensors"] == hashlib.sha256(
        (tiny_llama / "model.safetensors").read_bytes()).hexdigest()
    assert saved["tokenizer_from"] == "adapter" and saved["qlora"] is None
    assert "verification passed" in report.summary()


def test_merging_twice_gives_byte_identical_weights(sharded_llama, tmp_path):
    adapter = make_adapter(sharded_llama, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True,
                           target_modules="all-linear")
    for name in ("one", "two"):
        merge_adapter(adapter, tmp_path / name, base_model=str(sharded_llama), verify="off", max_shard_size="60KB")
    first = sorted((tmp_path / "one").glob("*.safetensors"))
    assert first and [p.read_bytes() for p in first] == [(tmp_path / "two" / p.name).read_bytes() for p in first]
    assert (tmp_path / "one" / "model.safetensors.index.json").read_bytes() == \
        (tmp_path / "two" / "model.safetensors.index.json").read_bytes()


@pytest.mark.parametrize("peft_type", ["IA3", "VERA", "ADALORA"])
def test_unsupported_adapter_types_are_refused_by_name(peft_type, tiny_llama, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": peft_type, "base_model_name_or_path": str(tiny_llama)}))
    with pytest.raises(UsageError, match=f"adapter type {peft_type} is not supported"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapters_that_rewrote_the_base_are_refused(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="init_lora_weights='pissa'"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama))


def test_adapter_for_another_base_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    with pytest.raises(MergeError, match="base model does not have"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="off")


def test_pre_quantized_base_is_refused(tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(MergeError, match="pre-quantized checkpoint"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(base))


def test_interrupted_merge_leaves_nothing_that_looks_complete(tiny_llama, tmp_path, monkeypatch):
    import functionalnetworkssft.merge.write as merge_module

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    real = merge_module.write_shards
    seen = {}

    def interrupted(folder, shards, progress=None):
        seen["folder"] = folder
        real(folder, shards, progress)
        assert not (tmp_path / "merged").exists()  # the target appears only by the final rename
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="off")
    assert seen["folder"].parent == tmp_path and seen["folder"].name.startswith(".merged.partial-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    # A killed run cannot clean up: its hidden partial folder is removed by the next merge into the same target.
    stale = tmp_path / ".merged.partial-999999"
    stale.mkdir()
    monkeypatch.setattr(merge_module, "write_shards", real)
    merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="off")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_bin_only_base_is_read_without_unpickling_code(tiny_llama, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / name, base / name)
    torch.save(load_file(tiny_llama / "model.safetensors"), base / "pytorch_model.bin")
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    merge_adapter(adapter, tmp_path / "merged", base_model=str(base), verify="off")
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), logits(peft_model(tiny_llama, adapter)),
                               atol=1e-4, rtol=0)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (base / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Exploit()}))
    with pytest.raises(MergeError, match="refused to load"):
        merge_adapter(adapter, tmp_path / "merged2", base_model=str(base), verify="off")
    assert not (tmp_path / "pwned").exists()


def test_qlora_merges_into_original_or_exactly_the_quantized_layers_round_trip(tiny_llama, tmp_path):
    import bitsandbytes.functional as bnbf

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    quantized = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    # Named as in the PEFT-wrapped training model, as fnsft train records them.
    recorded = ["base_model.model.model.layers.0.self_attn.q_proj.base_layer", "model.layers.1.mlp.up_proj"]
    (adapter / "fnsft_training.json").write_text(json.dumps({"quantization": "4bit", "quantized_modules": recorded,
                                                             "bnb_4bit_quant_type": "nf4",
                                                             "bnb_4bit_use_double_quant": True}))
    original = merge_adapter(adapter, tmp_path / "original", base_model=str(tiny_llama), verify="off")
    dequant = merge_adapter(adapter, tmp_path / "dequant", base_model=str(tiny_llama), verify="on",
                            qlora_merge_base="dequantized")
    assert original.qlora["merge_base"] == "original" and dequant.qlora["merge_base"] == "dequantized"
    assert json.loads((tmp_path / "dequant" / "merge_report.json").read_text())["qlora"]["quantized_modules"] == 2
    assert dequant.verified is True

    base = load_file(tiny_llama / "model.safetensors")
    plain = peft_model(tiny_llama, adapter).merge_and_unload().state_dict()
    got_original, got_dequant = merged_state(tmp_path / "original"), merged_state(tmp_path / "dequant")
    for name in got_original:
        torch.testing.assert_close(got_original[name], plain[name], atol=1e-5, rtol=1e-5)
    for name, tensor in got_dequant.items():
        module = name.removesuffix(".weight")
        if module in quantized:
            packed, state = bnbf.quantize_4bit(base[name], blocksize=64, compress_statistics=True, quant_type="nf4")
            delta = plain[name] - base[name]  # the adapter's delta, as PEFT computes it
            torch.testing.assert_close(tensor, bnbf.dequantize_4bit(packed, state) + delta, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(tensor, plain[name], atol=1e-4)
        else:  # embeddings, lm_head, norms and unquantized layers are merged into the original weights
            torch.testing.assert_close(tensor, plain[name], atol=1e-5, rtol=1e-5)

    (adapter / "fnsft_training.json").unlink()
    with pytest.raises(UsageError, match="--qlora_merge_base dequantized"):
        merge_adapter(adapter, tmp_path / "again", base_model=str(tiny_llama), qlora_merge_base="dequantized")


def test_fnsft_merge_loads_bitsandbytes_only_for_adapters_trained_on_a_quantized_base(tiny_llama, tmp_path):
    """The command hides bitsandbytes (1 s of PEFT's import) unless fnsft_training.json says the base was quantized,
    and a verified QLoRA merge into the round trip still works from the command line."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    code = ("import sys; from functionalnetworkssft.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sys.modules.get('bitsandbytes') is not None)")

    def merge(out: str, *extra: str) -> str:
        args = ["merge", "--adapter_path", str(adapter), "--base_model_name_or_path", str(tiny_llama),
                "--output_dir", str(tmp_path / out), *extra]
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]

    assert merge("plain") == "0 False"
    assert json.loads((tmp_path / "plain" / "merge_report.json").read_text())["verification"]["status"] == "passed"
    (adapter / "fnsft_training.json").write_text(json.dumps({"quantization": "4bit", "quantized_modules": [
        "model.layers.0.self_attn.q_proj"]}))
    assert merge("dequantized", "--qlora_merge_base", "dequantized") == "0 True"
    report = json.loads((tmp_path / "dequantized" / "merge_report.json").read_text())
    assert report["qlora"]["merge_base"] == "dequantized" and report["verification"]["status"] == "passed"


def test_fnsft_merge_command_prints_summary_and_reports_errors_in_one_line(tiny_gpt2, tmp_path, capsys):
    from functionalnetworkssft.cli import main

    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    args = ["merge", "--adapter_path", str(adapter), "--output_dir", str(tmp_path / "merged"), "--verify", "off"]
    assert main(args) == 0  # the base comes from adapter_config.json
    assert "merged 2 LoRA modules" in capsys.readouterr().out
    assert main(args[:-2] + ["--dtype", "int8"]) == 2
    assert main(["merge", "--adapter_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fnsft merge: error: --adapter_path {tmp_path / 'nope'}: no such folder."
    assert main(args[:-2] + ["--dtype", "bfloat16", "--verify", "off"]) == 0  # replaces the earlier merge
    assert {t.dtype for t in merged_state(tmp_path / "merged").values()} == {torch.bfloat16}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streaming_and_full_verification_agree_on_every_variant(variant, request, tmp_path):
    from functionalnetworkssft.merge.verify import verify_merge

    fixture, lora = VARIANTS[variant]
    base = request.getfixturevalue(fixture)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    streamed = merge_adapter(adapter, tmp_path / "merged", base_model=str(base), verify="on").verification
    full = verify_merge(tmp_path / "merged", base, adapter, output_dtype="float32", vocab_size=None, patches={},
                        device=torch.device("cpu"), trust_remote_code=False)
    assert streamed["status"] == full["status"] == "passed", (streamed, full)
    assert streamed["mode"] == "streaming" and full["greedy_equal"] is True
    assert streamed["top1_agreement"] == full["top1_agreement"] == 1.0
    assert streamed["max_abs_logit_diff"] < 1e-4 and full["max_abs_logit_diff"] < 1e-4
    assert all(b["max_abs_diff"] <= b["tolerance"] for b in streamed["blocks"])


@pytest.mark.parametrize("block,tensor,head_rows_at_once,dora", [
    ("model.layers.1", "model.layers.1.mlp.down_proj.weight", None, False),
    ("lm_head", "lm_head.weight", 2, False),  # the output head computed two rows of features at a time
    # DoRA reads its base layer's weight outside that layer's forward: the block is loaded whole, not leaf by leaf
    ("model.layers.0", "model.layers.0.self_attn.q_proj.weight", None, True),
])
def test_one_corrupted_element_fails_streaming_verification_naming_its_block_and_tensor(
        block, tensor, head_rows_at_once, dora, tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from functionalnetworkssft.merge import run, stream_verify

    if head_rows_at_once:
        monkeypatch.setattr(stream_verify, "LINEAR_BLOCK_ELEMENTS", head_rows_at_once * 32)

    written = run.write_merged

    def corrupt_one_element(plan, base, adapter, staging, *args):
        report = written(plan, base, adapter, staging, *args)
        state = load_file(staging / "model.safetensors")
        state[tensor][3, 5] += 0.5
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        return report

    monkeypatch.setattr(run, "write_merged", corrupt_one_element)
    units = []
    monkeypatch.setattr(stream_verify._Unit, "_run", lambda self, *a, _run=stream_verify._Unit._run, **k: (
        units.append(self), _run(self, *a, **k))[1])
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           use_dora=dora)
    with pytest.raises(MergeError) as failure:
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="on")
    assert f"first differing block {block}, tensor {tensor}" in str(failure.value)
    assert not (tmp_path / "merged").exists()
    blocks = [u for u in units if u.name.startswith("model.layers.")]
    assert blocks and all(u.leafwise is not dora for u in blocks)


MEMORY_PROBE = """
import json, sys, psutil, torch
from pathlib import Path
from functionalnetworkssft.merge import merge_adapter
from functionalnetworkssft.merge.io import BaseWeights
from functionalnetworkssft.merge.stream_verify import stream_verify
import peft, safetensors.torch, tqdm.auto  # everything the merge imports, loaded before the baseline
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
adapter, out, base = map(Path, sys.argv[1:4])


def peak():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork+exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def verify():
    return stream_verify(out, base, adapter, base=BaseWeights(base), output_dtype="float32", vocab_size=None,
                         patch=None, device=torch.device("cpu"), trust_remote_code=False)


before = psutil.Process().memory_info().rss
merge_adapter(adapter, out, base_model=str(base), verify="off")
figures = {"merge": peak() - before}
verify()  # once first, so that what it imports on first use counts as code, not as its data
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts here: what follows is verification alone
before = psutil.Process().memory_info().rss
result = verify()
figures.update(verification=peak() - before, status=result["status"], blocks=result["blocks_verified"])
print(json.dumps(figures))
"""


def test_merge_and_its_verification_hold_a_few_blocks_not_the_model(tmp_path):
    """A base of 48 blocks and hundreds of tensors is merged, then verified, each holding memory of a few blocks:
    never the whole model, let alone two of them as a whole-model check does."""
    from peft import LoraConfig, get_peft_model

    model = random_llama(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=48,
                         num_attention_heads=4, num_key_value_heads=4)
    model.save_pretrained(tmp_path / "base", max_shard_size="50MB")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    tensors = len(list(model.state_dict()))
    adapter = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                               init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    del model, adapter
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "adapter"), str(tmp_path / "merged"),
                             str(tmp_path / "base")], capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert tensors > 400 and model_bytes > 200e6
    row_block_bytes = 4 * BLOCK_ELEMENTS  # the merge's float32 working unit
    assert figures["merge"] < adapter_bytes + 16 * row_block_bytes < 0.4 * model_bytes, (figures, model_bytes)
    assert figures["status"] == "passed" and figures["blocks"] == 48 + 3
    # Measured here: about 4 blocks besides the adapter; the whole-model check holds two float32 models (98 blocks).
    assert figures["verification"] < adapter_bytes + 12 * block_bytes < 0.3 * model_bytes, (figures, block_bytes)


def test_verification_holds_one_weight_at_a_time_not_a_block(tmp_path):
    """Blocks far larger than the verification's fixed costs: each weight is loaded when its own layer runs and
    dropped after, so the check holds less than one block."""
    from peft import LoraConfig, get_peft_model

    model = random_llama(vocab_size=2048, hidden_size=512, intermediate_size=8192, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    model.save_pretrained(tmp_path / "base")
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    largest = max(p.numel() * 4 for p in model.model.layers[0].parameters())
    adapter = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                               init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    del model, adapter
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "adapter"), str(tmp_path / "merged"),
                             str(tmp_path / "base")], capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["status"] == "passed" and block_bytes > 50e6
    # Measured here: 26 MB, the largest weight (17 MB) and 10 MB of activations and bookkeeping; a block is 54 MB.
    assert figures["verification"] < largest + 24e6 < block_bytes, (figures, largest, block_bytes)


def test_a_merge_that_does_not_compute_base_plus_adapter_fails_verification(tiny_llama, tmp_path, capsys,
                                                                            corrupt_merge):
    from functionalnetworkssft.cli import main

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    code = main(["merge", "--adapter_path", str(adapter), "--output_dir", str(tmp_path / "merged"), "--verify", "on",
                 "--base_model_name_or_path", str(tiny_llama)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("fnsft merge: error:") and "verification" in err[-1]
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_a_whole_model_check_that_cannot_fit_is_refused_before_merging(tiny_llama, tmp_path, monkeypatch):
    import psutil

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 1 << 20})())
    with pytest.raises(UsageError, match="--verify full needs about .* use --verify on"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="full")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_blocks_computed_ahead_keep_their_order_pass_errors_on_and_stop_with_the_writer():
    import threading

    from functionalnetworkssft.merge.io import PlannedTensor, TensorInfo, _computed_ahead

    def tensor(name: str, values: list[int], fail_at: int | None = None) -> PlannedTensor:
        def produce():
            for i, value in enumerate(values):
                if i == fail_at:
                    raise RuntimeError(f"{name} broke")
                yield torch.tensor([value], dtype=torch.int32)
        return PlannedTensor(TensorInfo(name, torch.int32, (len(values),)), produce)

    raw = PlannedTensor(TensorInfo("r", torch.int32, (1,)), lambda fd: None, raw=True)
    got = [(t.info.name, b"".join(bytes(b) for b in blocks))
           for t, blocks in _computed_ahead([tensor("a", [1, 2, 3]), raw, tensor("b", [4, 5])])]
    assert got == [("a", torch.tensor([1, 2, 3], dtype=torch.int32).numpy().tobytes()), ("r", b""),
                   ("b", torch.tensor([4, 5], dtype=torch.int32).numpy().tobytes())]

    with pytest.raises(RuntimeError, match="b broke"):
        for _, blocks in _computed_ahead([tensor("a", [1]), tensor("b", [4, 5, 6], fail_at=1)]):
            list(blocks)

    threads = threading.active_count()
    for _, blocks in _computed_ahead([tensor("long", list(range(1000)))]):
        next(blocks)  # the writer gives up after one block (a full disk): the computing thread must end too
        break
    assert threading.active_count() == threads


def test_streaming_verification_keeps_the_adapter_on_the_cpu_whatever_device_peft_would_pick(
        tiny_llama, tmp_path, monkeypatch):
    """PEFT loads adapter tensors onto the GPU whenever one exists; the check must not depend on it (on an H200 the
    merge failed with 'tensors on cuda:0 and cpu' until the verification named the device)."""
    import peft.peft_model

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    monkeypatch.setattr(peft.peft_model, "infer_device", lambda: "meta")  # stands in for "cuda" on this machine
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama), verify="on")
    assert report.verification["status"] == "passed" and report.verification["mode"] == "streaming"


@pytest.fixture(scope="module")
def moe_bases(tmp_path_factory):
    """Tiny Mixtral and Qwen3-MoE with their real tokenizer kinds (tests/families.py)."""
    import families

    root = tmp_path_factory.mktemp("moe")
    return {name: families.build(families.BY_NAME[name], root / name) for name in ("mixtral", "qwen3-moe")}


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_lora_on_stacked_experts_merges_exactly_like_peft(name, moe_bases, tmp_path):
    """all-linear reaches a mixture of experts' stacked expert weights and router as LoRA on parameters (PEFT's
    target_parameters): fnsft merge writes each expert's own checkpoint tensors as PEFT's merge_and_unload computes
    them, and verifies the result."""
    base = moe_bases[name]
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules="all-linear")
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(base))
    assert report.verification["status"] == "passed", report.verification

    reference = peft_model(base, adapter)
    expected_logits = logits(reference)
    reference.merge_and_unload().save_pretrained(tmp_path / "peft-merged")  # per-expert tensors, as on disk
    expected, got = merged_state(tmp_path / "peft-merged"), merged_state(tmp_path / "merged")
    assert set(got) == set(expected) == set(merged_state(base))
    changed = 0
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        changed += not torch.equal(tensor, merged_state(base)[key])
    assert changed >= 2 * 4 * 3  # every expert's gate, up and down projection in both layers
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), expected_logits, atol=1e-4, rtol=0)


def test_a_wrong_expert_merge_fails_verification(moe_bases, tmp_path, corrupt_merge):
    adapter = make_adapter(moe_bases["qwen3-moe"], tmp_path / "adapter", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules="all-linear")
    with pytest.raises(MergeError, match="verification failed"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(moe_bases["qwen3-moe"]))
    assert not (tmp_path / "merged").exists()


def test_gpt_neox_head_is_found_under_its_checkpoint_name(tmp_path):
    """GPT-NeoX's checkpoint names its output head embed_out; transformers 5 loads it as lm_head. A LoRA on the head
    (modules_to_save) and the verification find it under the name the checkpoint uses."""
    import families

    base = families.build(families.BY_NAME["gpt-neox"], tmp_path / "neox")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["query_key_value"],
                           modules_to_save=["lm_head"])
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(base))
    assert report.verification["status"] == "passed", report.verification
    state = merged_state(tmp_path / "merged")
    assert "embed_out.weight" in state and "lm_head.weight" not in state
    reference = peft_model(base, adapter)
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), logits(reference), atol=1e-4, rtol=0)
    assert not torch.equal(state["embed_out.weight"], merged_state(base)["embed_out.weight"])


def test_experts_the_checkpoint_does_not_have_are_one_line_not_a_crash(moe_bases, tmp_path):
    from safetensors.torch import save_file

    source = moe_bases["qwen3-moe"]
    adapter = make_adapter(source, tmp_path / "adapter", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules="all-linear")
    base = tmp_path / "base"
    shutil.copytree(source, base)
    state = load_file(base / "model.safetensors")
    for key in [k for k in state if "layers.0.mlp.experts.3." in k]:
        del state[key]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match="do not make up its 4 experts of 128 rows"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(base))
