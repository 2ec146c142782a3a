"""Read the user's data in whatever format it comes, check it, and tokenize it with a loss mask.

Every record is normalised to a list of chat messages (or plain text) and rendered with the tokenizer's chat
template, so training sees exactly the prompt layout that `fnsft generate` and chat servers use at inference.

- `sources`: files, folders, Hub datasets and in-memory records, read into one training set and its validation data.
- `formats`: each source's format detected, every record normalised to chat messages or text.
- `tokenization`: rendering with the chat template and tokenizing with an assistant mask, for one example or whole sets.
- `cache`: tokenized sets kept for reruns with the same data, tokenizer, settings and code.
- `report`: what happened to the examples, counted, and the token counts of a tokenized set.
"""

from functionalnetworkssft.data.formats import SUPPORTED_FORMATS, chat_messages, detect_format, to_messages
from functionalnetworkssft.data.report import arrow_column, token_counts, trained_per_example
from functionalnetworkssft.data.sources import RawData, Source, from_memory, is_data_file, load, load_sources
from functionalnetworkssft.data.tokenization import (
    has_chat_template,
    render_prompt_ids,
    tokenize,
    tokenize_batch,
    tokenize_example,
)

__all__ = ["RawData", "SUPPORTED_FORMATS", "Source", "arrow_column", "chat_messages", "detect_format", "from_memory",
           "has_chat_template", "is_data_file", "load", "load_sources", "render_prompt_ids", "to_messages", "token_counts",
           "tokenize", "tokenize_batch", "tokenize_example", "trained_per_example"]
