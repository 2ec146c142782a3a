"""Export a transformers model folder (a merged or fully fine-tuned model) to one GGUF file for llama.cpp and
Ollama, streamed a tensor at a time and verified by loading it back.

    arch       which architectures, their GGUF metadata and tensor names
    vocab      the tokenizer as GGUF metadata (byte-level BPE)
    write      the streaming, atomic writer
    modelfile  the Ollama Modelfile beside the file
    verify     the exported file against its source: logits, tokenization, and llama.cpp where installed
    command    `fnsft export-gguf` and `export_gguf(...)`, which `fnsft train --convert_to_gguf` calls
"""

from functionalnetworkssft.export.command import OUTTYPES, ExportError, export_gguf

__all__ = ["OUTTYPES", "ExportError", "export_gguf"]
