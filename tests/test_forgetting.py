"""How much a fine-tune forgot, and the guards that hold it down: the numbers are checked against direct
computations on tiny models, the guard's exactness (lambda = 0, resume, padding-free, data-parallel) against runs
without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TOY, build_model, build_tokenizer, write_jsonl
from hostile import train_with_callback
from functionalnetworkssft.cli import main
from functionalnetworkssft.forgetting import divergence, reference, text
from functionalnetworkssft.forgetting.guard import ForgettingGuard, guarded_loss
from functionalnetworkssft.forgetting.probe import ForgettingProbe


def train(*args) -> int:
    return main(["train", *map(str, args)])


def history(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def tiny_peft():
    """A tiny Llama with a LoRA adapter whose B factors are random: the tuned model differs from its base."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer(chat=True)
    model = get_peft_model(build_model("llama", len(tokenizer), tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model.eval()


def windows(count: int, length: int = 24, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


def direct_kl_and_agreement(model, ids):
    """The definitions, computed the plain way: the base is the adapter switched off."""
    with torch.no_grad():
        tuned = model(input_ids=ids).logits[:, :-1].double()
        with model.disable_adapter():
            base = model(input_ids=ids).logits[:, :-1].double()
    kl = F.kl_div(tuned.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    nll = lambda logits: float(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:]))  # noqa: E731
    return float(kl.mean()), float((base.argmax(-1) == tuned.argmax(-1)).double().mean()), nll(tuned) - nll(base)


def test_the_probe_reports_the_kl_agreement_and_nll_change_of_a_direct_computation(tiny_peft):
    chunks = windows(10)
    probe = ForgettingProbe(chunks, reference.AdapterOff(), batch_size=4)
    measured = probe.measure(tiny_peft, step=0)
    kl, agreement, nll_change = direct_kl_and_agreement(tiny_peft, torch.tensor(chunks))
    assert kl > 1e-3  # the adapter really moves the model
    assert measured["forgetting_kl"] == pytest.approx(kl, rel=1e-4)
    assert measured["base_agreement"] == pytest.approx(agreement, abs=1e-9)
    assert measured["forgetting_nll_change"] == pytest.approx(nll_change, abs=1e-5)
    assert probe.tokens == 10 * 23


def test_the_top_k_snapshot_bounds_the_kl_from_below_and_is_exact_with_the_whole_vocabulary(tiny_peft):
    ids = torch.tensor(windows(6))
    exact, _, _ = direct_kl_and_agreement(tiny_peft, ids)
    with tiny_peft.disable_adapter():
        whole = reference.TopK.of(tiny_peft, ids, k=10_000)  # more than the vocabulary: every token kept
        partial = reference.TopK.of(tiny_peft, ids, k=32)
    results = {}
    for name, snapshot in (("whole", whole), ("partial", partial)):
        results[name] = ForgettingProbe(ids.tolist(), snapshot).measure(tiny_peft)["forgetting_kl"]
    assert results["whole"] == pytest.approx(exact, rel=1e-4)
    # The lumped tail can only under-count (log-sum inequality); on a near-uniform tiny model it misses a lot,
    # which is why the top-k snapshot is used only where no exact base is at hand.
    assert 0 < results["partial"] <= exact + 1e-7


def test_masked_target_kl_ignores_the_target_token_and_renormalises_the_rest():
    torch.manual_seed(0)
    base, tuned = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    got = divergence.masked_target_kl(tuned, base, targets)
    expected = []
    for b in range(2):
        for t in range(5):
            keep = [v for v in range(11) if v != targets[b, t]]
            p, q = base[b, t, keep].log_softmax(-1), tuned[b, t, keep].log_softmax(-1)
            expected.append(float((p.exp() * (p - q)).sum()))
    assert float(got) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # Moving only the target's logit leaves it unchanged: the guard does not fight the task's own loss.
    pushed = tuned.clone()
    pushed.scatter_add_(-1, targets[..., None], torch.full((2, 5, 1), 7.0))
    assert float(divergence.masked_target_kl(pushed, base, targets)) == pytest.approx(float(got), rel=1e-5)


def assert_same_value_and_gradient(model, term, direct):
    """`term()` and `direct()` (the definition, computed the plain way) give the same value and the same gradient
    of every trained parameter."""
    values, gradients = [], []
    for compute in (term, direct):
        model.zero_grad()
        value = compute()
        value.backward()
        values.append(float(value.detach()))
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    for name in gradients[1]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-7)


def test_the_kl_guard_term_and_its_gradient_equal_a_direct_computation(tiny_peft):
    stream = windows(6, seed=3)
    guard = ForgettingGuard("kl", 10.0, stream, reference.AdapterOff(), per_step=2)
    ids = torch.tensor(stream[2:4])  # micro-batch 1 reads windows 2 and 3 of the stream

    def direct():
        with torch.no_grad(), tiny_peft.disable_adapter():
            base = tiny_peft(input_ids=ids).logits[:, :-1].log_softmax(-1)
        tuned = tiny_peft(input_ids=ids).logits[:, :-1].log_softmax(-1)
        return (base.exp() * (base - tuned)).sum(-1).mean()

    assert_same_value_and_gradient(tiny_peft, lambda: guard.stream_term(tiny_peft, micro_step=1), direct)


def test_the_guard_stream_cycles_and_gives_each_process_its_own_windows():
    stream = windows(10, seed=4)
    first = ForgettingGuard("kl", 1.0, stream, None, rank=0, world=2, per_step=2)
    second = ForgettingGuard("kl", 1.0, stream, None, rank=1, world=2, per_step=2)
    assert first.windows(0).tolist() == stream[0:2] and second.windows(0).tolist() == stream[2:4]
    assert first.windows(1).tolist() == stream[4:6]
    assert second.windows(2).tolist() == [stream[0], stream[1]]  # windows 10, 11 wrap round to 0, 1


@pytest.mark.parametrize("scaled", [True, False])
def test_the_guard_weight_means_the_same_at_any_gradient_accumulation(tiny_peft, scaled):
    """The Trainer divides the returned loss by the accumulation steps unless the loss is normalised over the whole
    step already: the guard's per-micro-batch mean is scaled so that the step's total is lambda * mean term."""
    guard = ForgettingGuard("kl", 4.0, windows(8, seed=5), reference.AdapterOff(), per_step=2)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m), state=SimpleNamespace(global_step=3),
        current_gradient_accumulation_steps=4, loss_is_scaled_for_ga=scaled, args=SimpleNamespace())
    task = torch.tensor(1.5)
    with torch.no_grad():
        loss = guarded_loss(trainer, guard, tiny_peft, {}, 10, lambda m, i, n: task)
        expected_term = guard.stream_term(tiny_peft, 3 * 4)  # step 3, first micro-batch
    factor = 0.25 if scaled else 1.0
    assert float(loss) == pytest.approx(1.5 + 4.0 * factor * float(expected_term), rel=1e-6)


def test_masked_kl_on_a_padding_free_batch_equals_it_on_the_padded_batch(tiny_peft):
    """The guard sees the positions the task trains, whichever way the batch is laid out."""
    rows = [windows(1, length=n, seed=n)[0] for n in (9, 14, 6)]
    labels = [[-100] * 3 + r[3:] for r in rows]
    guard = ForgettingGuard("masked_kl", 1.0, [], reference.AdapterOff())
    width = max(map(len, rows))
    padded = {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
              "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
              "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}
    # Padding-free: one row, positions restarting per example, the first label of each example ignored.
    flat = {"input_ids": torch.tensor([sum(rows, [])]),
            "position_ids": torch.tensor([sum((list(range(len(r))) for r in rows), [])]),
            "labels": torch.tensor([sum(([-100] + lab[1:] for lab in labels), [])])}
    with torch.no_grad():
        results = []
        for batch in (padded, flat):
            logits = tiny_peft(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            results.append(float(guard.batch_term(tiny_peft, batch, logits)))
    assert results[0] > 1e-3
    assert results[1] == pytest.approx(results[0], rel=1e-4)


def test_the_guard_stream_shares_no_ngram_with_the_probe(tmp_path):
    tokenizer = build_tokenizer(chat=False)
    # Repeated passages: the same paragraph appears again later in the file, as in real corpora.
    import random

    rng = random.Random(0)
    paragraphs = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(30))
                  for _ in range(40)]
    body = "\n".join(paragraphs + paragraphs[::5])
    path = tmp_path / "general.txt"
    path.write_text(body)
    general = text.split(text.from_file(str(path), tokenizer, 512), "general.txt")
    assert general.probe and general.stream and general.dropped > 0
    held = set().union(*(text.ngrams(w) for w in general.probe))
    assert all(not (text.ngrams(w) & held) for w in general.stream)


def toy(tmp_path, rows=16):
    return write_jsonl(tmp_path / "toy.jsonl", TOY[:rows])


def adapter(out):
    return load_file(out / "final_model" / "adapter_model.safetensors")


def test_lambda_zero_trains_bit_identically_to_a_run_without_the_guard(tiny_llama, tmp_path):
    common = ["--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path), "--use_peft",
              "--max_steps", "3", "--per_device_train_batch_size", "4", "--validation_split", "0",
              "--learning_rate", "1e-2", "--save_strategy", "no"]
    assert train(*common, "--output_dir", tmp_path / "plain") == 0
    assert train(*common, "--output_dir", tmp_path / "zero", "--forgetting_guard", "kl",
                 "--forgetting_weight", "0") == 0
    plain, zero = adapter(tmp_path / "plain"), adapter(tmp_path / "zero")
    assert plain.keys() == zero.keys()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not any("forgetting_guard_loss" in h for h in history(tmp_path / "zero"))


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_the_kl_guard_lowers_what_the_probe_measures(tiny_llama, tmp_path, use_peft):
    common = ["--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 24), "--max_steps", "8",
              "--per_device_train_batch_size", "4", "--validation_split", "0", "--learning_rate", "2e-2",
              "--save_strategy", "no", "--logging_steps", "1"] + (["--use_peft"] if use_peft else [])
    assert train(*common, "--output_dir", tmp_path / "plain") == 0
    # Four windows per micro-batch (a share of 4 of the task's 100 tokens): on a tiny random model one window
    # holds too few contexts for the probe's text to feel it.
    assert train(*common, "--output_dir", tmp_path / "guarded", "--forgetting_guard", "kl", "--forgetting_weight",
                 "50", "--forgetting_guard_share", "4") == 0
    final = {}
    for name in ("plain", "guarded"):
        measured = [h for h in history(tmp_path / name) if "eval_forgetting_kl" in h]
        assert [h["step"] for h in measured] == [0, 8]  # at the start and at the end, without evaluation
        final[name] = measured[-1]["eval_forgetting_kl"]
        record = json.loads((tmp_path / name / "final_model" / "fnsft_training.json").read_text())
        assert record["forgetting"]["measurements"][-1]["forgetting_kl"] == final[name]
    assert final["plain"] > 0
    assert final["guarded"] < 0.7 * final["plain"], final
    logged = [h["forgetting_guard_loss"] for h in history(tmp_path / "guarded") if "forgetting_guard_loss" in h]
    assert len(logged) == 8 and all(v >= 0 for v in logged)


def test_the_probe_is_part_of_every_evaluation_record_and_the_summary(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path), "--output_dir", out,
                 "--use_peft", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
                 "--per_device_train_batch_size", "4") == 0
    evaluations = [h for h in history(out) if "eval_loss" in h]
    assert evaluations and all("eval_forgetting_kl" in h and "eval_base_agreement" in h for h in evaluations)
    start = next(h for h in history(out) if "eval_forgetting_kl" in h)
    assert start["step"] == 0 and start["eval_forgetting_kl"] == 0 and start["eval_base_agreement"] == 1
    printed = capsys.readouterr().out
    assert "Forgetting: on 1008 tokens of text the base model wrote" in printed


def test_probe_off_measures_nothing(tiny_gpt2, tmp_path):
    out = tmp_path / "out"
    assert train("--model_name_or_path", tiny_gpt2, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir", out,
                 "--use_peft", "--max_steps", "1", "--validation_split", "0", "--forgetting_probe", "off") == 0
    assert not any(k.startswith("eval_forgetting") for h in history(out) for k in h)
    assert "forgetting" not in json.loads((out / "final_model" / "fnsft_training.json").read_text())


def test_masked_kl_refuses_trainer_settings_that_change_the_task_loss(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  label_smoothing_factor: 0.1\n  loss_type: dft\n")
    code = train("--config", config, "--model_name_or_path", tmp_path / "no-model", "--dataset_name_or_path",
                 tmp_path / "d.jsonl", "--output_dir", tmp_path / "out", "--forgetting_guard", "masked_kl")
    err = capsys.readouterr().err
    assert code == 2 and "trainer: label_smoothing_factor, loss_type changes the task's loss" in err, err


def test_forgetting_flags_are_checked_before_anything_loads(tmp_path, capsys):
    code = train("--model_name_or_path", tmp_path / "no-model", "--dataset_name_or_path", tmp_path / "d.jsonl",
                 "--output_dir", tmp_path / "out", "--forgetting_weight", "3", "--forgetting_dataset",
                 tmp_path / "missing.txt", "--forgetting_guard", "sideways")
    err = capsys.readouterr().err
    assert code == 2
    assert "--forgetting_guard" in err and "sideways" in err
    code = train("--model_name_or_path", tmp_path / "no-model", "--dataset_name_or_path", tmp_path / "d.jsonl",
                 "--output_dir", tmp_path / "out", "--forgetting_weight", "3", "--forgetting_dataset",
                 tmp_path / "missing.txt")
    err = capsys.readouterr().err
    assert code == 2
    assert "--forgetting_weight needs --forgetting_guard" in err
    assert "--forgetting_dataset" in err and "no such file" in err
    assert "Traceback" not in err


def test_a_frozen_copy_that_cannot_fit_is_refused_in_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir",
                 tmp_path / "out", "--max_steps", "1", "--forgetting_guard", "kl")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "frozen copy of the base" in last and "MB free" in last and "--use_peft" in last, last
    assert not (tmp_path / "out" / "final_model").exists()


def test_every_process_on_the_machine_counts_for_a_frozen_copys_memory(monkeypatch):
    import psutil

    tokenizer = build_tokenizer(chat=False)
    model = build_model("gpt2", len(tokenizer), tokenizer)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=6 * size))
    assert reference.copy_problem(model, "--forgetting_guard kl") is None  # the copy and 3 x float32: 4 x size
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert "frozen copy" in reference.copy_problem(model, "--forgetting_guard kl")


def test_general_text_no_part_of_the_run_reads_is_said_to_be_unread(tiny_llama, tmp_path, capsys):
    assert train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir",
                 tmp_path / "out", "--use_peft", "--max_steps", "1", "--validation_split", "0",
                 "--forgetting_probe", "off", "--forgetting_dataset", general_text(tmp_path / "general.txt")) == 0
    printed = capsys.readouterr().out
    assert "general.txt is not read: only the probe and the kl and replay guards read general text" in printed


KILL_AT_SAVE = train_with_callback("""
class Callback(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_resumed_guarded_run_reads_the_stream_where_it_stopped(tiny_llama, tmp_path):
    common = ["--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 24), "--use_peft",
              "--lora_dropout", "0", "--max_steps", "8", "--save_steps", "4", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--validation_split", "0", "--learning_rate", "1e-2",
              "--forgetting_guard", "kl", "--forgetting_weight", "20", "--logging_steps", "1"]
    assert train(*common, "--output_dir", tmp_path / "straight") == 0
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, *map(str, common), "--output_dir", str(killed)],
                            capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == -9, result.stderr[-2000:]
    assert train(*common, "--output_dir", killed, "--resume_from_checkpoint", "latest") == 0
    straight, resumed = adapter(tmp_path / "straight"), adapter(killed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5)
    # The guard's term at every step, each in its own record (steps 1-4 before the kill, 5-8 after the resume):
    # the same windows, so the same values.
    guard_losses = [{h["step"]: h["forgetting_guard_loss"] for h in history(folder) if "loss" in h}
                    for folder in (tmp_path / "straight", killed)]
    assert sorted(guard_losses[1]) == list(range(1, 9))
    assert [guard_losses[1][s] for s in range(1, 9)] == pytest.approx([guard_losses[0][s] for s in range(1, 9)],
                                                                      rel=1e-5)


def test_two_processes_train_with_the_guard_and_report_forgetting_once(tiny_llama, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "functionalnetworkssft", "train", "--model_name_or_path", str(tiny_llama), "--dataset_name_or_path",
               str(toy(tmp_path)), "--output_dir", str(out), "--use_peft", "--max_steps", "3",
               "--per_device_train_batch_size", "2", "--validation_split", "0", "--forgetting_guard", "kl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Forgetting: on 1008 tokens") == 1
    measured = [h["step"] for h in history(out) if "eval_forgetting_kl" in h]
    assert measured == [0, 3]


def test_the_model_card_states_the_measured_forgetting_and_the_guard():
    from functionalnetworkssft.hub.card import CardInfo, render_card

    record = {"text": "/home/someone/corpus/general.txt", "guard": {"kind": "kl", "weight": 10.0},
              "measurements": [{"step": 0, "forgetting_kl": 0.0, "base_agreement": 1.0},
                               {"step": 40, "forgetting_kl": 0.0032, "base_agreement": 0.971}]}
    card = render_card(CardInfo(base_model="org/base", forgetting=record), "adapter", "me/model")
    assert "- Forgetting guard: kl (weight 10.0)" in card
    assert "KL(base || tuned) 0.0032 nats per token, next-token agreement with the base 97.1%" in card
    assert "/home/someone" not in card and "general.txt" in card


def test_forged_cached_text_is_written_again_not_fed_to_the_model(tiny_llama, tmp_path, monkeypatch):
    """A cache entry with token ids outside the vocabulary (damaged or planted) would index past the embedding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    first = text.generated(model, tokenizer, 2, 0, "fingerprint")
    entry = next((tmp_path / "cache" / "general_text").glob("*.json"))
    entry.write_text(json.dumps([[10**9] * text.WINDOW_TOKENS] * 2))
    assert text.generated(model, tokenizer, 2, 0, "fingerprint") == first
    assert json.loads(entry.read_text()) == first


def test_too_little_general_text_and_the_training_data_itself_are_refused(tiny_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    data = toy(tmp_path, 8)
    code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir",
                 tmp_path / "out", "--use_peft", "--max_steps", "1", "--forgetting_dataset", short)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--forgetting_dataset short.txt" in last and "at least 2" in last, last
    code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", data, "--output_dir",
                 tmp_path / "out", "--use_peft", "--forgetting_dataset", data)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "is the training or evaluation data" in last, last


def test_a_model_too_short_to_write_the_probe_text_is_refused_in_one_line(tmp_path, monkeypatch):
    from functionalnetworkssft.errors import UsageError

    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tokenizer(chat=True)
    model = build_model("llama", len(tokenizer), tokenizer)
    model.config.max_position_embeddings = 48
    with pytest.raises(UsageError, match="reads at most 48 tokens.*--forgetting_dataset"):
        text.generated(model, tokenizer, 2, 0, "short", text.PROBE_TOKENS)


def test_a_fifo_given_as_general_text_is_refused_not_read_forever(tiny_llama, tmp_path, capsys):
    fifo = tmp_path / "general.txt"
    os.mkfifo(fifo)
    code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir",
                 tmp_path / "out", "--use_peft", "--max_steps", "1", "--forgetting_dataset", fifo)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "not a regular file" in last, last


def general_text(path, paragraphs: int = 40):
    import random

    rng = random.Random(1)
    path.write_text("\n".join(" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
                                        for _ in range(30)) for _ in range(paragraphs)))
    return path


def test_the_same_file_spelled_another_way_is_still_refused_as_general_text(tiny_llama, tmp_path, capsys,
                                                                            monkeypatch):
    data = toy(tmp_path, 8)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(data)
    for spelling in ("./toy.jsonl", str(data), "link.jsonl"):
        code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", "toy.jsonl", "--output_dir",
                     tmp_path / "out", "--use_peft", "--forgetting_dataset", spelling)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and "is the training or evaluation data" in last, (spelling, last)


def test_a_weight_too_large_for_any_use_is_refused_before_anything_loads(tmp_path, capsys):
    code = train("--model_name_or_path", tmp_path / "no-model", "--dataset_name_or_path", tmp_path / "d.jsonl",
                 "--output_dir", tmp_path / "out", "--forgetting_guard", "kl", "--forgetting_weight", "1e300")
    err = capsys.readouterr().err
    assert code == 2 and "--forgetting_weight" in err and "10000" in err and "Traceback" not in err, err


def test_a_model_shorter_than_the_guards_windows_is_refused_in_one_line(tiny_llama, tmp_path, capsys):
    import shutil

    short = tmp_path / "short-model"
    shutil.copytree(tiny_llama, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 80}))
    code = train("--model_name_or_path", short, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir",
                 tmp_path / "out", "--use_peft", "--max_steps", "1", "--max_seq_length", "64",
                 "--forgetting_dataset", general_text(tmp_path / "general.txt"), "--forgetting_guard", "kl")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "reads at most 80 tokens" in last and "96-token windows" in last and "--forgetting_guard" in last, last


def test_general_text_under_any_name_is_read_and_a_bad_dataset_names_the_flag(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    named = general_text(tmp_path / "corpus.text")
    assert train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir", out,
                 "--use_peft", "--max_steps", "1", "--validation_split", "0", "--forgetting_dataset", named) == 0
    record = json.loads((out / "final_model" / "fnsft_training.json").read_text())
    assert record["forgetting"]["text"] == "corpus.text"
    binary = tmp_path / "noise.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    for given, code_wanted, said in ((binary, 2, "a binary file"), (empty, 1, "the dataset is empty")):
        code = train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--output_dir",
                     tmp_path / "refused", "--use_peft", "--max_steps", "1", "--forgetting_dataset", given)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == code_wanted and last.startswith("fnsft train: error: --forgetting_dataset"), last
        assert said in last, last


def test_the_base_behind_the_guard_runs_without_dropout_and_leaves_the_training_mode_as_it_was():
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer(chat=False)
    model = build_model("gpt2", len(tokenizer), tokenizer)  # dropout 0.1 everywhere
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.1)).train()
    ids = torch.tensor(windows(2, seed=7, vocab=len(tokenizer)))
    base = reference.AdapterOff()
    first, second = base.logits(model, input_ids=ids), base.logits(model, input_ids=ids)
    assert torch.equal(first, second)
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        expected = model(input_ids=ids).logits
    model.train()
    torch.testing.assert_close(first, expected)
    model.base_model.model.transformer.h[0].attn.eval()  # a module the caller keeps in evaluation mode
    base.logits(model, input_ids=ids)
    assert model.training and model.base_model.model.transformer.h[1].training
    assert not model.base_model.model.transformer.h[0].attn.training


def test_with_mask_forward_the_probe_measures_the_model_as_it_is_saved(tiny_llama, tmp_path):
    """The forward mask is training's alone: a run that barely moves the weights has forgotten nothing, although
    the masked forward differs from the base."""
    out = tmp_path / "out"
    assert train("--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 24), "--output_dir",
                 out, "--use_peft", "--max_steps", "1", "--validation_split", "0", "--learning_rate", "1e-12",
                 "--mask_mode", "lesion", "--ica_components", "4", "--mask_forward") == 0
    measured = [h for h in history(out) if "eval_forgetting_kl" in h]
    assert [h["step"] for h in measured] == [0, 1]
    assert measured[-1]["eval_forgetting_kl"] < 1e-6 and measured[-1]["eval_base_agreement"] == 1.0, measured


def test_a_resumed_run_keeps_the_measurements_made_before_its_checkpoint(tiny_llama, tmp_path):
    common = ["--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 16), "--use_peft",
              "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
              "--validation_split", "0", "--output_dir", tmp_path / "out"]
    assert train(*common, "--max_steps", "2") == 0
    assert train(*common, "--resume_from_checkpoint", "latest") == 0
    logged = [h["step"] for h in history(tmp_path / "out") if "eval_forgetting_kl" in h]
    record = json.loads((tmp_path / "out" / "final_model" / "fnsft_training.json").read_text())
    recorded = [m["step"] for m in record["forgetting"]["measurements"]]
    assert recorded[0] == 0 and recorded[-1] == 4 and recorded == sorted(set(logged)), (recorded, logged)


def test_sharded_training_refuses_the_guard_and_turns_the_probe_off(tiny_llama, tmp_path, capsys):
    """FSDP and DeepSpeed shard the weights that the probe's and the guard's own forwards read."""
    from functionalnetworkssft.forgetting import ForgettingPlan

    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  fsdp: full_shard\n")
    code = train("--config", config, "--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8),
                 "--output_dir", tmp_path / "out", "--use_peft", "--max_steps", "1", "--forgetting_guard", "kl")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--forgetting_guard kl cannot run under FSDP or DeepSpeed" in last, last
    cfg = SimpleNamespace(forgetting_probe="on", forgetting_guard="none", forgetting_weight=None,
                          forgetting_dataset=None, trainer_overrides={"fsdp": "full_shard"})
    assert ForgettingPlan.create(cfg, None, None, "fingerprint") is None
    assert "Forgetting probe: off under FSDP or DeepSpeed" in capsys.readouterr().out


def test_a_run_cannot_resume_with_another_guard(tiny_llama, tmp_path, capsys):
    common = ["--model_name_or_path", tiny_llama, "--dataset_name_or_path", toy(tmp_path, 8), "--use_peft",
              "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "4", "--validation_split", "0",
              "--forgetting_probe", "off", "--forgetting_guard", "kl", "--output_dir", tmp_path / "out"]
    assert train(*common, "--max_steps", "1") == 0
    for change, flag in ((["--forgetting_weight", "3"], "--forgetting_weight 3.0 differs from the 10.0"),
                         (["--forgetting_guard_share", "0.5"], "--forgetting_guard_share 0.5 differs"),
                         (["--forgetting_guard", "replay"], "--forgetting_guard replay differs from the kl")):
        code = train(*common, *change, "--resume_from_checkpoint", "latest")
        err = capsys.readouterr().err
        assert code == 2 and any(flag in line for line in err.splitlines()), err
    assert train(*common, "--resume_from_checkpoint", "latest") == 0


@pytest.mark.parametrize("family, gradient_accumulation", [("llama", 1), ("llama", 2), ("mixtral", 2)])
def test_the_masked_kl_guards_own_task_loss_is_the_trainers(tiny_llama, tmp_path, family, gradient_accumulation):
    """masked_kl computes the task's loss itself (TRL's fused head gives no logits): at a weight too small to
    matter, the run is the plain run, a mixture of experts' router loss included."""
    model = tiny_llama
    if family == "mixtral":
        from families import FAMILIES, build

        model = build(next(f for f in FAMILIES if f.name == "mixtral"), tmp_path / "mixtral")
        assert json.loads((model / "config.json").read_text())["router_aux_loss_coef"] > 0
    common = ["--model_name_or_path", model, "--dataset_name_or_path", toy(tmp_path, 16), "--use_peft",
              "--lora_dropout", "0", "--max_steps", "3", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", gradient_accumulation, "--validation_split", "0",
              "--learning_rate", "1e-2", "--save_strategy", "no", "--logging_steps", "1", "--forgetting_probe", "off"]
    assert train(*common, "--output_dir", tmp_path / "plain") == 0
    assert train(*common, "--output_dir", tmp_path / "masked", "--forgetting_guard", "masked_kl",
                 "--forgetting_weight", "1e-20") == 0
    losses = [[h["loss"] for h in history(tmp_path / name) if "loss" in h] for name in ("plain", "masked")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key in ("entropy", "mean_token_accuracy"):  # TRL's own metrics, which its loss would have logged
        logged = [[h[key] for h in history(tmp_path / name) if "loss" in h] for name in ("plain", "masked")]
        assert logged[1] == pytest.approx(logged[0], rel=1e-4), key
    if family == "mixtral":  # the router's loss is in both
        assert all("aux_loss" in h for h in history(tmp_path / "plain") if "loss" in h)
    plain, masked = adapter(tmp_path / "plain"), adapter(tmp_path / "masked")
    for key in plain:
        torch.testing.assert_close(masked[key], plain[key], atol=1e-6, rtol=1e-4)


def test_the_replay_term_and_its_gradient_equal_a_direct_computation(tiny_peft):
    stream = windows(4, seed=9)
    guard = ForgettingGuard("replay", 1.0, stream, None, per_step=2)
    ids = torch.tensor(stream[2:4])
    assert_same_value_and_gradient(
        tiny_peft, lambda: guard.stream_term(tiny_peft, micro_step=1),
        lambda: F.cross_entropy(tiny_peft(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:]))


def test_the_generated_texts_cache_tells_chat_templates_apart(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FNSFT_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    text.generated(model, tokenizer, 1, 0, "fingerprint", 8)
    tokenizer.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    text.generated(model, tokenizer, 1, 0, "fingerprint", 8)
    assert len(list((tmp_path / "cache" / "general_text").glob("*.json"))) == 2
