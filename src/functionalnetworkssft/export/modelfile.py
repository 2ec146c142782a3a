"""An Ollama Modelfile beside the GGUF: the chat template in Ollama's Go-template form, and its stop tokens.

Ollama cannot run a Jinja chat template, so the common families are recognised by their markers and written as the
templates Ollama itself ships for them. Any other template gets a Modelfile without TEMPLATE, and the log says so.
"""

from __future__ import annotations

from pathlib import Path

from functionalnetworkssft.outputs import write_text_atomic

CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
          ["<|im_start|>", "<|im_end|>"])
LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n'
          '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
          ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
MISTRAL = ('[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
           '{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n'
           '{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}',
           ["[INST]", "[/INST]", "</s>"])
GEMMA = ('{{- $system := "" }}\n{{- range .Messages }}\n{{- if eq .Role "system" }}\n'
         '{{- if not $system }}{{ $system = .Content }}\n{{- else }}{{ $system = printf "%s\\n\\n%s" $system .Content }}\n'
         '{{- end }}\n{{- continue }}\n{{- else if eq .Role "user" }}<start_of_turn>user\n{{- if $system }}\n'
         '{{ $system }}\n{{- $system = "" }}\n{{- end }}\n{{- else if eq .Role "assistant" }}<start_of_turn>model\n'
         '{{- end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n',
         ["<start_of_turn>", "<end_of_turn>"])
PHI3 = ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
        ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"])

# Marker in the Jinja template -> (family, Ollama template, stops). Checked in order: the markers are distinct.
FAMILIES = [("<|im_start|>", "ChatML", CHATML), ("<|start_header_id|>", "Llama-3", LLAMA3),
            ("<start_of_turn>", "Gemma", GEMMA), ("[INST]", "Mistral", MISTRAL), ("<|assistant|>", "Phi-3", PHI3)]


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
    for marker, name, (template, stops) in FAMILIES:
        if marker in chat_template:
            return name, template, stops
    return None


def write_modelfile(path: Path, gguf_name: str, chat_template: str | None) -> str:
    """Write the Modelfile; returns the family written, or a sentence saying why no template was."""
    found = family(chat_template)
    lines = [MARKER, f"FROM ./{gguf_name}", ""]
    if found is None:
        why = ("the model has no chat template" if not chat_template else
               "its chat template is not one of ChatML, Llama-3, Mistral, Gemma or Phi-3")
        lines += [f"# No TEMPLATE was written: {why}. Ollama then matches the GGUF's tokenizer.chat_template",
                  "# against its own templates; write a TEMPLATE here if the replies look wrong."]
        result = f"no template written ({why})"
    else:
        name, template, stops = found
        lines += [f"# Chat template: {name} (converted from the model's Jinja template).",
                  f'TEMPLATE """{template}"""', ""] + [f'PARAMETER stop "{stop}"' for stop in stops]
        result = name
    write_text_atomic(path, "\n".join(lines) + "\n")
    return result
