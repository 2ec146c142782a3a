"""`fnsft generate`: a model's reply to a prompt, so a user can try a result at once."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from functionalnetworkssft import data, modeling
from functionalnetworkssft.errors import FnsftError, UsageError
from functionalnetworkssft.options import Options, arg, field_problems, parse
from functionalnetworkssft.weights import DamagedFile, adapter_weights_file, load_tensors, read_adapter_config


@dataclass
class SamplingOptions(Options):
    """What `fnsft generate` and `fnsft chat` share: the model and how it samples."""

    model: str = arg("A merged or full model folder, an adapter folder (final_model/, adapter/), a .gguf file or a "
                     "Hub id. May also be given as the first positional argument.")
    system: str | None = arg("Optional system message.", default=None)
    max_new_tokens: int = arg("Most tokens to generate.", default=128, positive=True)
    temperature: float = arg("Sampling temperature; 0 means greedy decoding.", default=0.0, minimum=0)
    top_p: float = arg("Nucleus sampling: sample from the smallest set of tokens holding this much probability "
                       "(with --temperature above 0).", default=1.0, positive=True, maximum=1)
    trust_remote_code: bool = arg("Allow model code from the Hub to run.", default=False)


@dataclass
class GenerateConfig(SamplingOptions):
    """Print a model's reply to a prompt as it is generated, chat template applied (greedy unless --temperature > 0)."""

    prompt: str | None = arg("The user message (required).", default=None)


@dataclass
class ChatConfig(SamplingOptions):
    """Chat with a model in the terminal: the conversation is kept and rendered with the chat template each turn.
    /reset starts over, /exit (or end of input) quits."""


def _parse(cls, argv: list[str] | None, prog: str):
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    cfg = parse(cls, argv, prog)
    problems = field_problems(cfg)
    if problems:
        raise UsageError(problems)
    return cfg


def main(argv: list[str] | None, prog: str = "fnsft generate") -> None:
    cfg = _parse(GenerateConfig, argv, prog)
    if cfg.prompt is None:
        raise UsageError("--prompt is required: the user message to answer.")
    if not cfg.prompt.strip():
        raise UsageError("--prompt is empty; give the user message to answer.")
    model, tokenizer = load_for_inference(cfg.model, cfg.trust_remote_code)
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": cfg.prompt}]
    reply(model, tokenizer, messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stream=True)


def chat(argv: list[str] | None, prog: str = "fnsft chat") -> None:
    cfg = _parse(ChatConfig, argv, prog)
    model, tokenizer = load_for_inference(cfg.model, cfg.trust_remote_code)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    # Bytes, decoded here: a line that is not UTF-8 is refused on its own instead of ending the chat.
    source = getattr(sys.stdin, "buffer", sys.stdin)
    print(f"Chatting with {cfg.model}; /reset starts over, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = source.readline()
        if not line:
            break
        try:
            text = (line.decode("utf-8") if isinstance(line, bytes) else line).strip()
        except UnicodeDecodeError:
            print("(that line is not UTF-8 text; nothing was sent)", file=sys.stderr)
            continue
        if text == "/exit":
            break
        if not text:
            continue
        if "\x00" in text:
            print("(that line holds a NUL character; nothing was sent)", file=sys.stderr)
            continue
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(model, tokenizer, messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stream=True)
        except UsageError as exc:  # too long for the model: say so and keep the conversation as it was
            messages.pop()
            print(f"({exc}{' /reset starts over.' if len(messages) > len(start) else ''})", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": answer})


def load_for_inference(name: str, trust_remote_code: bool = False):
    """A model ready to generate; an adapter folder is loaded on top of the base it was trained from."""
    path = Path(name)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        config = read_adapter_config(path, flag="model")
        weights = adapter_weights_file(path)
        try:
            load_tensors(weights)  # before PEFT reads it: a damaged or code-running file is one line
        except DamagedFile as exc:
            raise FnsftError(f"{weights}: {exc}.") from None
        # PEFT records the folder or Hub id the adapter was trained on (for GGUF bases, the converted folder).
        base = config.get("base_model_name_or_path")
        if not base:
            raise FnsftError(f"{path}: the adapter does not name its base model.")
        source = modeling.resolve(base)
        _refuse_remote_code(source, trust_remote_code)
        model = modeling.load_model(source, "auto", trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(model, str(path))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise FnsftError(f"{path}: the adapter does not fit its base model {base} "
                             f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})."
                             ) from None
        tokenizer = modeling.load_tokenizer(modeling.ModelSource(name, str(path)), trust_remote_code)
    else:
        source = modeling.resolve(name, flag="model")
        _refuse_remote_code(source, trust_remote_code)
        model = modeling.load_model(source, "auto", trust_remote_code=trust_remote_code)
        tokenizer = modeling.load_tokenizer(source, trust_remote_code)
    return model.eval(), tokenizer


def _refuse_remote_code(source: modeling.ModelSource, trust_remote_code: bool) -> None:
    problem = modeling.remote_code_problem(source, trust_remote_code, flag="model")
    if problem:
        raise UsageError(problem)


def context_length(model) -> int | None:
    """The most tokens the model can read (prompt and reply together), as its config declares it."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int, temperature: float = 0.0,
          top_p: float = 1.0, stream: bool = False) -> str:
    """The model's reply to a conversation (chat template applied); with `stream`, printed as it is generated."""
    import torch
    from transformers import TextStreamer

    ids = data.render_prompt_ids(tokenizer, messages)
    limit = context_length(model)
    if limit is not None and len(ids) >= limit:
        raise UsageError(f"the conversation is {len(ids)} tokens long and the model reads at most {limit}; shorten "
                         "it.")
    if limit is not None and len(ids) + max_new_tokens > limit:
        # Past its context the model has no positions left: generating on would fail or run unbounded.
        max_new_tokens = limit - len(ids)
        print(f"(the reply is capped at {max_new_tokens} new tokens: the model reads at most {limit} tokens)",
              file=sys.stderr)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
    model.train(was_training)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
