"""Functional networks: templates from ICA (format, determinism, bounded memory), and training restricted to or away
from a network, whose protected rows stay bit-identical to the base in every checkpoint, the final model and the
merged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONVERSATIONS, TOY, write_jsonl
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.networks.collect import TokenReservoir
from functionalnetworkssft.networks.layout import decoder_blocks, parse_layers
from functionalnetworkssft.networks.templates import Templates, read_templates
from hostile import cli, one_line, train_with_callback

# Channels of the hand-written template below; the tiny models have 2 layers of 32 channels.
NETWORK = {0: {0: [1, 2, 3], 1: [4, 5]}, 1: {1: [10, 11]}, 2: {0: [30]}}
PROJECTION = {"llama": ("model.layers.{}.mlp.down_proj", 0), "gpt2": ("transformer.h.{}.mlp.c_proj", 1)}


@pytest.fixture
def template(tmp_path) -> Path:
    path = tmp_path / "templates.json"
    Templates("hand-made", [0, 1], 32, NETWORK, {"note": "written by a test"}).write(path)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", TOY[:16])


def base_of(arch, tiny_llama, tiny_gpt2):
    return tiny_llama if arch == "llama" else tiny_gpt2


def weight(state: dict, arch: str, layer: int) -> torch.Tensor:
    """The layer's MLP output projection with output channels as rows."""
    name, axis = PROJECTION[arch]
    value = state[f"{name.format(layer)}.weight"]
    return value.T if axis == 1 else value


def held_rows(mode: str, components: list[int], layers: list[int]) -> dict[int, list[int]]:
    network: dict[int, set[int]] = {}
    for c in components:
        for layer, chans in NETWORK[c].items():
            network.setdefault(layer, set()).update(chans)
    return {layer: sorted(network.get(layer, set())) if mode == "lesion"
            else sorted(set(range(32)) - network.get(layer, set())) for layer in layers}


# ---- templates -------------------------------------------------------------------------------------------------------
def test_fnsft_templates_writes_the_earlier_format_deterministically_with_a_summary_and_a_picture(
        tiny_llama, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"messages": m} for m in CONVERSATIONS]))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Row {i}: the quick brown fox."} for i in range(30)])
    args = ["templates", tiny_llama, chat, text, "--ica_components", "4", "--samples_per_dataset", "12",
            "--max_tokens", "200", "--seed", "3"]
    assert cli(capsys, *args, "--output", tmp_path / "a" / "t.json")[0] == 0
    printed = capsys.readouterr()
    assert cli(capsys, *args, "--output", tmp_path / "b" / "t.json")[0] == 0
    first, second = (tmp_path / "a" / "t.json").read_bytes(), (tmp_path / "b" / "t.json").read_bytes()
    assert first == second
    loaded = json.loads(first)
    assert loaded["layout"] == {"captured_layers_sorted": [0, 1], "hidden_size": 32}
    assert set(loaded["templates"]) == {"0", "1", "2", "3"}
    for per_layer in loaded["templates"].values():
        assert set(per_layer) <= {"0", "1"} and all(0 <= c < 32 for chans in per_layer.values() for c in chans)
    provenance = loaded["provenance"]
    assert provenance["seed"] == 3 and provenance["datasets"] == ["chat.json", "text.jsonl"]
    assert provenance["parameters"]["ica_threshold"] == "zscore" and provenance["tokens_used"] == 200
    assert provenance["tokens_seen"] > 200  # the budget, not the data, bounds what is kept
    assert (tmp_path / "a" / "coverage.png").stat().st_size > 1000
    del printed


def test_a_different_seed_or_rule_gives_different_templates(tiny_llama, tmp_path, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Row {i}: the quick brown fox jumps."} for i in range(40)])
    outputs = []
    for extra in ([], ["--ica_threshold", "percentile", "--ica_percentile", "90"]):
        out = tmp_path / f"t{len(outputs)}.json"
        assert cli(capsys, "templates", tiny_llama, text, "--ica_components", "3", "--output", out, *extra)[0] == 0
        outputs.append(read_templates(out))
    percentile = outputs[1]
    # The percentile rule keeps exactly the top (100 - p)% of |weights|: 10% of 64 channels, rounded up.
    assert all(sum(len(c) for c in comp.values()) == 7 for comp in percentile.components.values())
    assert outputs[0].components != percentile.components


def test_the_token_reservoir_is_seeded_uniform_and_bounded():
    stream = np.arange(1000, dtype=np.float32).reshape(-1, 1)
    kept = []
    for seed in range(300):
        reservoir = TokenReservoir(10, 1, seed)
        for start in range(0, 1000, 37):  # rows arrive in uneven batches, as tokens of examples do
            reservoir.add(stream[start:start + 37])
        assert reservoir.matrix().shape == (10, 1) and reservoir.seen == 1000
        kept.append(reservoir.matrix()[:, 0].copy())
    again = TokenReservoir(10, 1, 0)
    again.add(stream)
    assert np.array_equal(np.sort(again.matrix()[:, 0]), np.sort(kept[0]))
    halves = np.concatenate(kept) < 500
    assert 0.45 < halves.mean() < 0.55  # every row equally likely to be kept


def test_layer_specs():
    assert parse_layers("0:4,9:", 12, "--layers") == [0, 1, 2, 3, 9, 10, 11]
    assert parse_layers("-1", 12, "--layers") == [11]
    assert parse_layers(None, 3, "--layers") == [0, 1, 2]
    for bad in ("x", "12", "3:1", "1:2:3"):
        with pytest.raises(UsageError, match="--layers"):
            parse_layers(bad, 12, "--layers")


def test_an_unsupported_architecture_is_one_line_naming_what_was_looked_for(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from conftest import build_tokenizer

    tokenizer = build_tokenizer(chat=False)
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 4)
    code, errors, _ = cli(capsys, "templates", folder, text, "--output", tmp_path / "t.json")
    assert code == 2
    one_line(errors, "GPTNeoXForCausalLM: no decoder MLPs found", "model.layers[i].mlp.down_proj",
             "transformer.h[i].mlp.c_proj")


# ---- training with networks ------------------------------------------------------------------------------------------
def train(capsys, model, data, out, *extra):
    return cli(capsys, "train", "--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", out,
               "--max_steps", "4", "--save_steps", "2", "--validation_split", "0", "--learning_rate", "1e-2",
               "--per_device_train_batch_size", "4", *extra)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["lesion", "preserve"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_protected_rows_stay_bit_identical_in_checkpoints_final_and_merged_models(
        tiny_llama, tiny_gpt2, template, data, tmp_path, capsys, arch, mode, method):
    base_dir = base_of(arch, tiny_llama, tiny_gpt2)
    out = tmp_path / "out"
    lora = ["--use_peft", "--merge_adapter_with_base"] if method == "lora" else []
    code, errors, printed = train(capsys, base_dir, data, out, "--mask_mode", mode, "--ica_template_path", template,
                                  "--ica_component_ids", "0", "1", *lora)
    assert code == 0, errors
    assert f"Functional-network mask ({mode}): 7 network channels in 2 of 2 masked layers" in printed
    held = held_rows(mode, [0, 1], [0, 1])
    base = load_file(base_dir / "model.safetensors")
    if method == "lora":
        for folder in (out / "checkpoint-2", out / "checkpoint-4", out / "final_model"):
            adapter = load_file(folder / "adapter_model.safetensors")
            for layer, rows in held.items():
                name = PROJECTION[arch][0].format(layer)
                b = adapter[f"base_model.model.{name}.lora_B.weight"]
                assert torch.count_nonzero(b[rows]) == 0, (folder.name, layer)
                open_rows = sorted(set(range(32)) - set(rows))
                assert torch.count_nonzero(b[open_rows]) > 0  # the open rows did train
        merged = load_file(out / "merged_model" / "model.safetensors")
        for layer, rows in held.items():
            assert torch.equal(weight(merged, arch, layer)[rows], weight(base, arch, layer)[rows])
            assert not torch.equal(weight(merged, arch, layer), weight(base, arch, layer))
        record = json.loads((out / "final_model" / "fnsft_training.json").read_text())["functional_networks"]
        assert record["mask_mode"] == mode and record["component_ids"] == [0, 1] and record["network_channels"] == 7
    else:
        for folder in (out / "checkpoint-2", out / "checkpoint-4", out / "final_model"):
            tuned = load_file(folder / "model.safetensors")
            for layer, rows in held.items():
                assert torch.equal(weight(tuned, arch, layer)[rows], weight(base, arch, layer)[rows]), folder.name
                if arch == "gpt2":  # Conv1D's bias belongs to its output channels too
                    name = PROJECTION[arch][0].format(layer) + ".bias"
                    assert torch.equal(tuned[name][rows], base[name][rows])
                assert not torch.equal(weight(tuned, arch, layer), weight(base, arch, layer))


def test_a_bf16_base_keeps_its_protected_rows_bit_identical_after_the_merge(tiny_llama_bf16, template, data,
                                                                            tmp_path, capsys):
    out = tmp_path / "out"
    code, errors, _ = train(capsys, tiny_llama_bf16, data, out, "--use_peft", "--merge_adapter_with_base",
                            "--mask_mode", "lesion", "--ica_template_path", template)
    assert code == 0, errors
    base = load_file(tiny_llama_bf16 / "model.safetensors")
    merged = load_file(out / "merged_model" / "model.safetensors")
    for layer, rows in held_rows("lesion", [0, 1, 2], [0, 1]).items():
        a, b = weight(merged, "llama", layer)[rows], weight(base, "llama", layer)[rows]
        assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_mask_layers_limit_the_mask_to_those_layers(tiny_llama, template, data, tmp_path, capsys):
    out = tmp_path / "out"
    code, errors, printed = train(capsys, tiny_llama, data, out, "--mask_mode", "preserve", "--ica_template_path",
                                  template, "--ica_component_ids", "0", "--ica_mask_layers", "1:")
    assert code == 0, errors
    assert "2 network channels in 1 of 1 masked layers; down_proj rows: 30 held, 2 may change" in printed
    base, tuned = load_file(tiny_llama / "model.safetensors"), load_file(out / "final_model" / "model.safetensors")
    frozen = sorted(set(range(32)) - {4, 5})
    assert torch.equal(weight(tuned, "llama", 1)[frozen], weight(base, "llama", 1)[frozen])
    assert not torch.equal(weight(tuned, "llama", 1)[[4, 5]], weight(base, "llama", 1)[[4, 5]])
    changed = (weight(tuned, "llama", 0) != weight(base, "llama", 0)).any(dim=1)
    assert int(changed.sum()) > 16  # layer 0 is outside the mask: its rows train freely


def test_preserve_with_an_empty_masked_layer_freezes_it(tiny_llama, template, data, tmp_path, capsys):
    out = tmp_path / "out"
    code, errors, printed = train(capsys, tiny_llama, data, out, "--use_peft", "--mask_mode", "preserve",
                                  "--ica_template_path", template, "--ica_component_ids", "2")
    assert code == 0, errors
    assert "1 masked layer(s) without network channels frozen in down_proj" in printed
    adapter = load_file(out / "final_model" / "adapter_model.safetensors")
    b1 = adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    b0 = adapter["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert torch.count_nonzero(b1) == 0
    assert torch.count_nonzero(b0[[30]]) > 0 and torch.count_nonzero(b0[[0, 1, 2]]) == 0


@pytest.mark.parametrize("extra, needle, status", [
    (["--ica_component_ids", "7"], "--ica_component_ids: 7 not in", 2),
    (["--ica_component_ids", "2", "--ica_mask_layers", "1"], "the network is empty: components 2 of", 2),
    (["--ica_mask_layers", "5:"], "--ica_mask_layers '5:' selects no layer of the model's 2", 2),
    (["--lora_target_modules", "q_proj"], "--mask_mode needs the MLP output projection (down_proj)", 2),
])
def test_bad_network_settings_are_one_line_before_training(tiny_llama, template, data, tmp_path, capsys, extra,
                                                            needle, status):
    out = tmp_path / "out"
    code, errors, _ = train(capsys, tiny_llama, data, out, "--use_peft", "--mask_mode", "lesion",
                            "--ica_template_path", template, *extra)
    assert code == status
    one_line(errors, needle)
    assert not out.exists()


def test_templates_for_another_model_or_malformed_files_are_refused(tiny_llama, template, data, tmp_path, capsys):
    other = tmp_path / "other.json"
    Templates("other", [0, 1, 2, 3], 64, {0: {3: [60]}}).write(other)
    code, errors, _ = train(capsys, tiny_llama, data, tmp_path / "o1", "--mask_mode", "lesion",
                            "--ica_template_path", other)
    assert code == 2
    assert any("made for hidden size 64, but the model has 32" in e for e in errors)
    assert any("captured layer 3, but the model has 2 layers" in e for e in errors)
    for content, needle in (("{", "not valid JSON"), ("[]", "expected a JSON object"),
                            (json.dumps({"layout": {"captured_layers_sorted": [0], "hidden_size": 32},
                                         "templates": {"0": {"1": [3]}}}), "layer '1' is not among the captured"),
                            (json.dumps({"layout": {"captured_layers_sorted": [0], "hidden_size": 32},
                                         "templates": {"0": {"0": [99]}}}), "channels must be indices below 32")):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        code, errors, printed = train(capsys, "./not-loaded", data, tmp_path / "o2", "--mask_mode", "lesion",
                                      "--ica_template_path", bad)
        assert code == 2
        one_line(errors, f"--ica_template_path {bad}", needle)
        assert "Data:" not in printed
    code, errors, _ = train(capsys, tiny_llama, data, tmp_path / "o3", "--ica_template_path", template)
    assert code == 2
    one_line(errors, "--ica_template_path needs --mask_mode lesion or preserve")


KILL_AT_SAVE = train_with_callback("""
class Callback(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_with_a_built_template_recomputes_nothing_and_keeps_the_invariant(tiny_llama, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_llama), "--dataset_name_or_path", str(data), "--output_dir", str(out),
            "--use_peft", "--max_steps", "4", "--save_steps", "2", "--validation_split", "0", "--mask_mode",
            "lesion", "--ica_components", "3", "--learning_rate", "1e-2"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, *args], capture_output=True, text=True,
                            timeout=300, env=os.environ)
    assert killed.returncode == -9, killed.stderr[-2000:]
    saved = (out / "global_templates.json").read_bytes()
    code, errors, printed = cli(capsys, "train", *args, "--resume_from_checkpoint", "latest",
                                "--ica_component_ids", "0")
    assert code == 2
    one_line(errors, "--ica_component_ids 0 differs from the none that checkpoint-2 was trained with")
    code, errors, printed = cli(capsys, "train", *args, "--resume_from_checkpoint", "latest")
    assert code == 0, errors
    assert "Building functional-network templates" not in printed
    assert (out / "global_templates.json").read_bytes() == saved
    templates = read_templates(out / "global_templates.json")
    network = templates.network(None, [0, 1], "t")
    adapter = load_file(out / "final_model" / "adapter_model.safetensors")
    for layer, rows in network.items():
        assert torch.count_nonzero(adapter[f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_B.weight"][rows]) \
            == 0


def test_mask_forward_trains_with_masked_outputs_and_leaves_no_hook_behind(tiny_llama, template, data, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    code, errors, printed = train(capsys, tiny_llama, data, out, "--use_peft", "--merge_adapter_with_base",
                                  "--mask_mode", "preserve", "--ica_template_path", template, "--mask_forward",
                                  "--sample_prompts", "Tell me about item 3.")
    assert code == 0, errors
    assert "--mask_forward: the masked channels' MLP outputs are zeroed during training only" in printed
    report = json.loads((out / "merged_model" / "merge_report.json").read_text())
    assert report["verification"]["status"] == "passed"  # the merged model computes what base+adapter computes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    assert all(not block.mlp._forward_hooks for block in decoder_blocks(model))


def test_the_model_card_says_which_network_was_protected():
    from functionalnetworkssft.hub.card import CardInfo, render_card

    card = CardInfo(base_model="org/base", networks={"mask_mode": "lesion", "network_channels": 591,
                                                      "component_ids": [0, 3], "mask_layers": "all"})
    text = render_card(card, "merged", "alice/m")
    assert ("- Functional networks (lesion): 591 MLP output channels from ICA components 0, 3 (layers all); the "
            "network's channels were protected and everything else could change.") in text
