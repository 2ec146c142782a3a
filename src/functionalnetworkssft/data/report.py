"""The counted data report: what happened to the examples, each kind of problem once with its count and first
example, and the token counts of a tokenized set."""

from __future__ import annotations

import logging

from functionalnetworkssft.errors import DataError

log = logging.getLogger("functionalnetworkssft.data")

# Notes tokenize_example leaves on an example; `tokenize` counts them and reports each kind once.
NOTE_NO_ASSISTANT = "no_assistant"
NOTE_LAST_TURN = "last_turn_only"
NOTE_WHOLE = "whole_conversation"
NOTE_TEMPLATE = "template_error:"


class ProblemTally:
    """Problems found in one split's records: count and first example of each kind, reported together."""

    def __init__(self, source: str, split: str, total: int, describe):
        # describe(kind) -> (what it means, "error" | "skip" | "note")
        self.source, self.split, self.total, self.describe = source, split, total, describe
        self.kinds: dict[str, list[int]] = {}  # kind -> [count, first index]

    def add(self, kind: str, index: int) -> None:
        entry = self.kinds.setdefault(kind, [0, index])
        entry[0] += 1

    def report(self, kept: int) -> None:
        lines = {"error": [], "skip": [], "note": []}
        for kind, (count, first) in self.kinds.items():
            text, severity = self.describe(kind)
            lines[severity].append(f"{count} with {text} (first: example {first})")
        if lines["error"]:
            raise DataError("\n".join(f"{self.source}: {self.split} data: {line}." for line in lines["error"]))
        if lines["skip"]:
            log.warning("%s: skipped %d of %d %s examples: %s.", self.source, self.total - kept, self.total,
                        self.split, "; ".join(lines["skip"]))
        for line in lines["note"]:
            log.warning("%s: %s data: %s.", self.source, self.split, line)
        if kept == 0:
            raise DataError(f"{self.source}: no usable {self.split} example is left; see the warnings above.")


def report_notes(found: dict[str, list], source: str, split: str) -> None:
    if NOTE_TEMPLATE in found:
        count, first, note = found[NOTE_TEMPLATE]
        raise DataError(f"{source}: the model's chat template rejects {count} {split} example(s) (first: example "
                        f"{first}: {note[len(NOTE_TEMPLATE):]}); fix the data, or use a model or template that "
                        "accepts it.")
    if NOTE_WHOLE in found:
        count, first, _ = found[NOTE_WHOLE]
        raise DataError(f"{source}: in {count} {split} example(s) (first: example {first}) the chat template renders "
                        "earlier turns differently once later ones follow, so the assistant tokens cannot be told "
                        "apart from the prompt; add --train_on_prompt to train on whole conversations.")
    if NOTE_LAST_TURN in found:
        count, first, _ = found[NOTE_LAST_TURN]
        log.warning("%s: in %d %s example(s) (first: example %d) the chat template rewrites earlier turns once later "
                    "ones follow; only the last assistant turn of each is trained.", source, count, split, first)
    if NOTE_NO_ASSISTANT in found:
        count, first, _ = found[NOTE_NO_ASSISTANT]
        log.warning("%s: skipped %d %s example(s) with no assistant turn (first: example %d); add --train_on_prompt "
                    "to train on them as plain text.", source, count, split, first)


def arrow_column(dataset, name: str):
    """One column of a Dataset (through any selection of its rows) as Arrow data, for whole-column arithmetic:
    iterating `dataset[name]` formats one row at a time, which dominates the run on large datasets."""
    return dataset.with_format("arrow")[name].combine_chunks()


def trained_per_example(tokenized):
    """The number of trained (assistant) tokens in each example, as a numpy array."""
    import numpy as np
    import pyarrow.compute as pc

    masks = arrow_column(tokenized, "assistant_masks")
    return np.bincount(pc.list_parent_indices(masks).to_numpy(), minlength=len(masks),
                       weights=pc.list_flatten(masks).to_numpy(zero_copy_only=False)).astype(np.int64)


def token_counts(tokenized) -> tuple[int, int]:
    """All tokens and trained tokens of a tokenized dataset."""
    import pyarrow.compute as pc

    return (int(pc.sum(pc.list_value_length(arrow_column(tokenized, "input_ids"))).as_py() or 0),
            int(trained_per_example(tokenized).sum()))


def with_trained_tokens(tokenized) -> list[int]:
    """Indices of the examples with at least one trained token."""
    import numpy as np

    return np.flatnonzero(trained_per_example(tokenized) > 0).tolist()
