"""The tokenizer as GGUF metadata, so that llama.cpp tokenizes as transformers does.

Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM) are written as llama.cpp's "gpt2" model: every token in id
order with its type, the merges, the pre-tokenizer by the name llama.cpp knows it under, the special token ids and
the chat template. llama.cpp picks its pre-tokenizer regex from that name alone, so a tokenizer whose splitting rule
is not one of the known ones is refused rather than exported to tokenize differently.

SentencePiece tokenizers (Llama-2, Mistral, Phi-3, Gemma: BPE with byte fallback) are written as llama.cpp's "llama"
model from the base's tokenizer.model: every piece with its score and type (normal, unknown, control, byte), the
tokens added on top of it from tokenizer_config.json, and whether a space is put before the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from functionalnetworkssft.export.architectures import UnsupportedModel

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.json pre-tokenizer regexes (the Split pattern) of the families llama.cpp has a name for.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = "gpt-2 (ByteLevel), smollm (Digits + ByteLevel), llama-bpe (Llama-3's split), qwen2 (Qwen2's split)"


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, read from its structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise UnsupportedModel(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) "
                           f"is not one llama.cpp can reproduce; supported: {PRE_TOKENIZERS}.")


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer's metadata; returns a summary for the report."""
    import gguf
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModel(f"GGUF export: {model_dir} has no tokenizer.json; only fast (tokenizers) byte-level "
                               "BPE tokenizers can be exported.")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("byte_fallback") or model.get("type") == "Unigram":
        if not (model_dir / "tokenizer.model").is_file():
            raise UnsupportedModel(f"GGUF export: {path} holds a SentencePiece tokenizer but {model_dir} has no "
                                   "tokenizer.model; copy the base model's tokenizer.model into it (fnsft train and "
                                   "fnsft merge carry it into their outputs).")
        return _sentencepiece(writer, model_dir, vocab_size)
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"GGUF export supports byte-level BPE tokenizers; {path} holds a "
                               f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''} "
                               "tokenizer.")
    pre = pre_tokenizer_name(tokenizer_json)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(max(vocab_size, len(by_id))):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(CONTROL if added[index].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UnsupportedModel(f"GGUF export: {path} has no BPE merges.")
    summary = _special_tokens(writer, special, tokenizer)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges), **summary}


def _sentencepiece(writer, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's "llama" tokenizer from tokenizer.model, as its converter builds it."""
    import gguf
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.model"
    processor = SentencePieceProcessor()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        # Read once: the pieces and the normalizer spec come from the same bytes.
        serialized = path.read_bytes()
        proto.ParseFromString(serialized)
        processor.LoadFromSerializedProto(serialized)
    except Exception as exc:  # OSError, sentencepiece's RuntimeError, protobuf's DecodeError: not such a model
        raise UnsupportedModel(f"GGUF export: {path} is not a SentencePiece model ({exc}).") from None
    size = max(vocab_size, processor.vocab_size())
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for index in range(processor.vocab_size()):
        tokens[index], scores[index] = processor.IdToPiece(index), processor.GetScore(index)
        types[index] = (UNKNOWN if processor.IsUnknown(index) else CONTROL if processor.IsControl(index)
                        else UNUSED if processor.IsUnused(index) else BYTE if processor.IsByte(index) else NORMAL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for index, added in tokenizer.added_tokens_decoder.items():
        if index >= size or types[index] in (UNKNOWN, CONTROL, BYTE):
            continue  # the model's own unknown, control and byte pieces keep their type and score
        if added.special:
            tokens[index], types[index] = added.content, CONTROL
        else:
            tokens[index], types[index] = added.content.replace("\u2581", " "), USER_DEFINED
        scores[index] = -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens))
    summary = _special_tokens(writer, special, tokenizer)
    return {"model": "llama", "pre": "default", "tokens": len(tokens), "merges": 0, **summary}


def _special_tokens(writer, special, tokenizer) -> dict[str, Any]:
    """The special token ids, whether encoding adds BOS/EOS, and the chat template, into the file."""
    # The ids transformers uses win over what SpecialVocab could infer from the files.
    for kind in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{kind}_token_id", None)
        if index is not None:
            special.special_token_ids[kind] = index
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        special.chat_template = template
    # What encoding a text really adds (the post-processor decides, whatever add_bos_token says).
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and tokenizer.bos_token_id is not None and \
        ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and tokenizer.eos_token_id is not None and \
        ids[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    return {"special_token_ids": dict(special.special_token_ids),
            "chat_template_text": template if isinstance(template, str) else None}
