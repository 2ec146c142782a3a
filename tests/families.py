"""Tiny random models of the families people fine-tune, each with its family's real tokenizer kind and a chat
template in its family's format, built locally in well under a second each.

Byte-level BPE tokenizers are trained with `tokenizers` and given the family's pre-tokenizer (GPT-2's ByteLevel,
Llama-3's or Qwen2's split); SentencePiece tokenizers (Llama-2, Mistral, Mixtral, Phi-3, Gemma) are trained with
`sentencepiece` (BPE with byte fallback) and shipped as the family ships them: `tokenizer.model` beside the files
transformers writes. The templates are written here in each family's turn format (not copied from model repos).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import CORPUS

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama-2 and Mistral put a system message into the first user turn.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ system }}{% endif %}"
    "{{ m['content'] }}[/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first %}{{ system }}{% endif %}{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3: a reply may think first; asked not to, the template writes an empty thought.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")
GRANITE_TEMPLATE = (
    "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}<|end_of_text|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}")
TULU_TEMPLATE = (  # OLMo-2 Instruct's turns
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers config class
    config: dict[str, Any]
    tokenizer: str  # "bpe" or "sentencepiece"
    pre: str | None = None  # BPE: "gpt2", "llama3" or "qwen2"
    specials: tuple[str, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)  # bos/eos/pad/unk -> token
    template: str | None = None
    moe: bool = False


DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
SP_ROLES = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}

FAMILIES = [
    Family("llama3", "LlamaConfig", {**DENSE, "tie_word_embeddings": False}, "bpe", "llama3",
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|end_of_text|>"}, LLAMA3_TEMPLATE),
    Family("llama3-tied", "LlamaConfig", {**DENSE, "tie_word_embeddings": True}, "bpe", "llama3",
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|end_of_text|>"}, LLAMA3_TEMPLATE),
    Family("llama2", "LlamaConfig", {**DENSE, "num_key_value_heads": 4}, "sentencepiece", roles=SP_ROLES,
           template=LLAMA2_TEMPLATE),
    Family("mistral", "MistralConfig", {**DENSE, "sliding_window": None}, "sentencepiece",
           specials=("[INST]", "[/INST]"), roles=SP_ROLES, template=MISTRAL_TEMPLATE),
    Family("mixtral", "MixtralConfig", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                        "sliding_window": None}, "sentencepiece", specials=("[INST]", "[/INST]"),
           roles=SP_ROLES, template=MISTRAL_TEMPLATE, moe=True),
    Family("qwen2.5", "Qwen2Config", {**DENSE, "tie_word_embeddings": True}, "bpe", "qwen2",
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
           CHATML_TEMPLATE),
    Family("qwen3", "Qwen3Config", {**DENSE, "head_dim": 16, "tie_word_embeddings": True}, "bpe", "qwen2",
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, QWEN3_TEMPLATE),
    Family("qwen3-moe", "Qwen3MoeConfig", {**DENSE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 64, "decoder_sparse_step": 1,
                                           "norm_topk_prob": True},
           "bpe", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, QWEN3_TEMPLATE, moe=True),
    Family("gemma2", "Gemma2Config", {**DENSE, "head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
           "sentencepiece", specials=("<start_of_turn>", "<end_of_turn>"),
           roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, template=GEMMA_TEMPLATE),
    Family("gemma3", "Gemma3TextConfig", {**DENSE, "head_dim": 16, "sliding_window": 64,
                                          "query_pre_attn_scalar": 16},
           "sentencepiece", specials=("<start_of_turn>", "<end_of_turn>"),
           roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, template=GEMMA_TEMPLATE),
    Family("phi3", "Phi3Config", {**DENSE, "num_key_value_heads": 4, "pad_token_id": None}, "sentencepiece",
           specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
           roles={"bos": "<s>", "eos": "<|endoftext|>", "unk": "<unk>", "pad": "<|endoftext|>"},
           template=PHI3_TEMPLATE),
    Family("gpt2", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}, "bpe", "gpt2",
           ("<|endoftext|>",), {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}),
    Family("gpt-neox", "GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "max_position_embeddings": 256,
                                         "rotary_pct": 0.25, "tie_word_embeddings": False}, "bpe", "gpt2",
           ("<|endoftext|>", "<|padding|>"), {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|padding|>"}),
    Family("olmo2", "Olmo2Config", DENSE, "bpe", "gpt2",
           ("<|endoftext|>", "<|pad|>"), {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"},
           TULU_TEMPLATE),
    Family("granite", "GraniteConfig", {**DENSE, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                        "attention_multiplier": 0.0625, "logits_scaling": 8.0,
                                        "tie_word_embeddings": True}, "bpe", "gpt2",
           ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"),
           {"bos": "<|end_of_text|>", "eos": "<|end_of_text|>", "pad": "<|end_of_text|>"}, GRANITE_TEMPLATE),
    # Four layers: the fourth has no rope (SmolLM3's every-4th-layer NoPE).
    Family("smollm3", "SmolLM3Config", {**DENSE, "num_hidden_layers": 4, "no_rope_layer_interval": 4,
                                        "tie_word_embeddings": True}, "bpe",
           "llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
           {"bos": "<|begin_of_text|>", "eos": "<|im_end|>", "pad": "<|end_of_text|>"}, CHATML_TEMPLATE),
    Family("falcon", "FalconConfig", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "max_position_embeddings": 256}, "bpe", "gpt2",
           (">>ABSTRACT<<", "<|endoftext|>"), {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}),
]
BY_NAME = {family.name: family for family in FAMILIES}


def bpe_tokenizer(family: Family):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family.pre == "gpt2")
    if family.pre == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        split = LLAMA3_SPLIT if family.pre == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320 + len(family.specials), special_tokens=list(family.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    roles = {f"{role}_token": token for role, token in family.roles.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def sentencepiece_model(family: Family) -> bytes:
    """A SentencePiece BPE model with byte fallback, as Llama-2, Mistral, Phi-3 and Gemma ship them."""
    import sentencepiece as spm

    gemma = family.roles.get("bos") == "<bos>"
    ids = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    pieces = {"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"}
    if gemma:  # Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3
        ids = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}
        pieces = {"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>"}
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=list(family.specials), hard_vocab_limit=False,
        add_dummy_prefix=not gemma,  # Gemma's tokenizer puts no space before the text
        minloglevel=2, **ids, **pieces)
    return buffer.getvalue()


def sentencepiece_tokenizer(family: Family, folder: Path):
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(family))
    gemma = family.roles.get("bos") == "<bos>"
    config = {"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "add_bos_token": True,
              "add_eos_token": False, **{f"{role}_token": token for role, token in family.roles.items()}}
    if family.specials:
        config["additional_special_tokens"] = list(family.specials)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if family.name == "phi3":
        # Phi-3's tokenizer.json puts the space before the text with a normalizer, not with Metaspace.
        from tokenizers import normalizers

        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    return tokenizer


def build(family: Family, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` with its tokenizer (and chat template) into `folder`."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if family.tokenizer == "sentencepiece":
        tokenizer = sentencepiece_tokenizer(family, folder)
    else:
        tokenizer = bpe_tokenizer(family)
    if family.template:
        tokenizer.chat_template = family.template
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(token) for role, token in family.roles.items()
           if role != "unk"}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **{**ids, **family.config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
