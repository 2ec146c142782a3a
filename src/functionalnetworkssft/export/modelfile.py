"""An Ollama Modelfile beside the GGUF: the chat template in Ollama's Go-template form, and its stop tokens.

Ollama cannot run a Jinja chat template, so the common families are recognised by their markers and written as the
templates Ollama itself ships for them. Any other template gets a Modelfile without TEMPLATE, and the log says so.
"""

from __future__ import annotations

from pathlib import Path

from functionalnetworkssft.outputs import write_text_atomic

# Each family: its turn template in Ollama's Go form (what Ollama ships for that family) and the markers that end
# a reply. The stops written are those markers plus the model's own end tokens (write_modelfile's `eos_tokens`).
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
          ["<|im_start|>", "<|im_end|>"])
# Qwen3: ChatML whose replies may start with a thought; asked not to think (`ollama run --think=false`), the reply
# starts with an empty one, as the model's own template writes it.
QWEN3 = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n'
         '{{ if and (eq .Role "assistant") .Thinking }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}'
         '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
         '{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}',
         ["<|im_start|>", "<|im_end|>"])
LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n'
          '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
          ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
# Llama-2: the system message goes into the first [INST] block, between <<SYS>> markers.
LLAMA2 = ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{ end }}'
          '{{- end }}{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}[INST] '
          '{{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]'
          '{{ $first = false }}{{- else if eq .Role "assistant" }} {{ .Content }} </s><s>{{- end }}{{- end }}',
          ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
MISTRAL = ('[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
           '{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n'
           '{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}',
           ["[INST]", "[/INST]"])
# Gemma: the system message opens the first user turn, followed by a blank line.
GEMMA = ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- continue }}'
         '{{- end }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
         '{{ if and $system (eq .Role "user") }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
         '{{ .Content }}<end_of_turn>\n'
         '{{ end }}<start_of_turn>model\n',
         ["<start_of_turn>", "<end_of_turn>"])
PHI3 = ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
        ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"])
# OLMo-2 Instruct (Tulu's turns): like Phi-3's role markers, but a reply ends with the end-of-text token.
TULU = ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{{ if eq .Role "assistant" }}<|endoftext|>{{ end }}\n'
        '{{ end }}<|assistant|>\n',
        ["<|system|>", "<|user|>", "<|assistant|>"])
GRANITE = ('{{- range .Messages }}<|start_of_role|>{{ .Role }}<|end_of_role|>{{ .Content }}<|end_of_text|>\n'
           '{{ end }}<|start_of_role|>assistant<|end_of_role|>',
           ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"])

# Markers in the Jinja template -> (family, Ollama template, stops). The first entry all of whose markers the
# template holds wins: the more specific families come first.
FAMILIES = [(("<|im_start|>", "<think>"), "Qwen3 (ChatML with thinking)", QWEN3),
            (("<|im_start|>",), "ChatML", CHATML),
            (("<|start_header_id|>",), "Llama-3", LLAMA3),
            (("<start_of_turn>",), "Gemma", GEMMA),
            (("[INST]", "<<SYS>>"), "Llama-2", LLAMA2),
            (("[INST]",), "Mistral", MISTRAL),
            (("<|assistant|>", "<|end|>"), "Phi-3", PHI3),
            (("<|assistant|>",), "OLMo-2 / Tulu", TULU),
            (("<|start_of_role|>",), "Granite", GRANITE)]
NAMES = "Qwen3, ChatML, Llama-3, Gemma, Llama-2, Mistral, Phi-3, OLMo-2 / Tulu or Granite"


MARKER = "# Written by fnsft export-gguf; rewritten by the next export to this folder."


def is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().rstrip("\n") == MARKER
    except OSError:
        return False


def family(chat_template: str | None) -> tuple[str, str, list[str]] | None:
    if not chat_template:
        return None
    for markers, name, (template, stops) in FAMILIES:
        if all(marker in chat_template for marker in markers):
            return name, template, stops
    return None


def end_tokens(model_dir: Path) -> list[str]:
    """The texts of the tokens a model ends its reply with: its tokenizer's end token and every end token its
    generation config names (Llama-3's <|eot_id|> and <|end_of_text|>, Gemma's <end_of_turn>)."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        configured = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        configured = None
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer)]
    return list(dict.fromkeys(t for t in tokens if isinstance(t, str) and t))


def write_modelfile(path: Path, gguf_name: str, chat_template: str | None, eos_tokens: list[str] = ()) -> str:
    """Write the Modelfile; returns the family written, or a sentence saying why no template was. `eos_tokens`: the
    texts of the tokens the model ends a reply with (its tokenizer's and generation config's end tokens)."""
    found = family(chat_template)
    lines = [MARKER, f"FROM ./{gguf_name}", ""]
    if found is None:
        why = ("the model has no chat template" if not chat_template else
               f"its chat template is not one of {NAMES}")
        lines += [f"# No TEMPLATE was written: {why}. Ollama then matches the GGUF's tokenizer.chat_template",
                  "# against its own templates; write a TEMPLATE here if the replies look wrong."]
        stops = list(dict.fromkeys(eos_tokens))
        result = f"no template written ({why})"
    else:
        name, template, markers = found
        lines += [f"# Chat template: {name} (converted from the model's Jinja template).",
                  f'TEMPLATE """{template}"""', ""]
        stops = list(dict.fromkeys([*markers, *eos_tokens]))
        result = name
    # A stop is one line of the Modelfile in double quotes: a token text that could break out is left out.
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop and not set(stop) & set('"\\\n\r')]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return result
