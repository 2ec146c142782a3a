"""Export a transformers model folder (a merged or fully fine-tuned model) to one GGUF file for llama.cpp and
Ollama, streamed a tensor at a time and verified by loading it back.

    architectures  which architectures: their GGUF metadata, tensor names and layouts (and back), refusals
    vocab          the tokenizer as GGUF metadata (byte-level BPE, SentencePiece)
    write          the streaming, atomic writer
    modelfile      the Ollama Modelfile beside the file
    llama_cpp      llama.cpp in a child process: running a file, quantizing to the k-quants
    verify         the exported file read back against its source: weights, logits, tokenization, metadata,
                   and transformers' and llama.cpp's own readings
    command        `fnsft export-gguf` and `export_gguf(...)`, which `fnsft train --convert_to_gguf` calls
"""

from functionalnetworkssft.export.command import OUTTYPES, ExportError, export_gguf

__all__ = ["OUTTYPES", "ExportError", "export_gguf"]
