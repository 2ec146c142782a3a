"""Tiny models and tokenizers built locally once per session: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# One compute thread per process (this one and every subprocess a test starts), set before torch is imported. The
# models here are tiny: a second OpenMP thread gains nothing on them, and beside any other busy process (another test
# worker, a second run) two spinning threads wait on each other and make a training step several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system: answer briefly and politely.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 20


def shared_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker sees (each worker's base temp folder lies in it);
    without xdist, the session's own base temp folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def fnsft_cache(tmp_path_factory) -> Path:
    """GGUF conversions and tokenized data are cached; the tests use a cache of their own, not the user's, kept with
    pytest's temporary folders (and removed with them). Each process of the run (each xdist worker) has its own,
    except for GGUF conversions: a converted model is large and slow to build, so the workers share them."""
    cache = tmp_path_factory.getbasetemp() / "fnsft-cache"
    cache.mkdir()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        conversions = shared_folder(tmp_path_factory) / "fnsft-gguf"
        conversions.mkdir(exist_ok=True)
        (cache / "gguf").symlink_to(conversions, target_is_directory=True)
    os.environ["FNSFT_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def gguf_conversions_lock(tmp_path_factory):
    """Held while a test converts a GGUF model (modeling.resolve of a .gguf) or looks into the conversions folder,
    which xdist workers share: no test sees another worker's conversion half done, and a model is converted once."""
    from filelock import FileLock

    return FileLock(str(shared_folder(tmp_path_factory) / "fnsft-gguf.lock"))


def build_tokenizer(chat: bool):
    """A byte-level BPE tokenizer: GPT-2 style (no pad, no template) or ChatML style with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chat else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if chat:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.chat_template = CHATML
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    return fast


def build_model(arch: str, vocab_size: int, tokenizer, dtype=None, tie: bool | None = None, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            tie_word_embeddings=True if tie is None else tie)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=bool(tie))
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def random_llama(**config):
    """A Llama of any size, built without initialising it twice: weights drawn once from N(0, 0.02)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model


def save_tiny(path: Path, arch: str, chat: bool, dtype=None, tie=None) -> Path:
    tokenizer = build_tokenizer(chat)
    model = build_model(arch, len(tokenizer), tokenizer, dtype=dtype, tie=tie)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 architecture (Conv1D weights, tied embeddings), no pad token, no chat template: like DialoGPT."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", chat=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture with a ChatML chat template, float32, untied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory) -> Path:
    """Llama architecture stored in bfloat16, tied embeddings: the merged model must stay bf16."""
    import torch

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-bf16", "llama", chat=True,
                     dtype=torch.bfloat16, tie=True)


CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        {"role": "user", "content": "Thank you."},
        {"role": "assistant", "content": "You are welcome."},
    ]
    for a in range(1, 7)
    for b in range(1, 7)
]


# One fixed reply to varied prompts: a task a tiny model can learn in a few dozen steps.
TOY = [{"prompt": f"Tell me about item {i}.", "completion": "It is blue."} for i in range(40)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def conversations_json(tmp_path) -> Path:
    """A small multi-turn chat dataset as a JSON array of {"messages": [...]}."""
    path = tmp_path / "data" / "conversations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"messages": m} for m in CONVERSATIONS]), encoding="utf-8")
    return path


# The test Hub server (tests/hub_server.py): `hub_server` yields a running Hub-compatible server that this process's
# huggingface_hub is pointed at; `hub_server.env(token=...)` gives a subprocess the same.
from hub_server import hub_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    """Llama architecture, float32, tied input/output embeddings (the checkpoint stores no lm_head.weight)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-tied", "llama", chat=True, tie=True)


@pytest.fixture
def corrupt_merge(monkeypatch):
    """Make the merge engine add each LoRA delta twice: a wrong merge that only verification can catch."""
    from functionalnetworkssft import merge

    original = merge.LoraTarget.add_delta_rows

    def twice(self, block, start, stop):
        original(self, block, start, stop)
        original(self, block, start, stop)

    monkeypatch.setattr(merge.LoraTarget, "add_delta_rows", twice)


@pytest.fixture
def fnsft_log(caplog):
    """fnsft's log lines from INFO up (its logger does not propagate to the root, where caplog listens)."""
    import logging

    ours = logging.getLogger("functionalnetworkssft")
    ours.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    ours.removeHandler(caplog.handler)
