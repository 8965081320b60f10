"""The bundled toy task: reverse a four-letter lowercase word. Random models fail it; a few hundred LoRA steps fix it.

The files under recipes/data/{reverse,preference,capitals,classify}/ are this module's output:
    python -m finetune.toy recipes/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(4))


def example(word: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"reverse: {word}"},
            {"role": "assistant", "content": word[::-1]},
        ]
    }


def splits(n_train: int = 8000, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train and test words, deterministic in `seed`."""
    rng = random.Random(seed)
    test: list[str] = []
    seen: set[str] = set()
    while len(test) < n_test:
        word = _word(rng)
        if word not in seen:
            seen.add(word)
            test.append(word)
    train = []
    while len(train) < n_train:
        word = _word(rng)
        if word not in seen:
            train.append(word)
    return {"train": [example(w) for w in train], "test": [example(w) for w in test]}


def preferences(n_train: int = 2000, n_test: int = 200, seed: int = 1) -> dict[str, list[dict]]:
    """Pairs for a reward model: the reversed word is chosen, a random other word rejected (implicit prompt)."""
    rng = random.Random(seed + 1000)
    out: dict[str, list[dict]] = {}
    for split, rows in splits(n_train, n_test, seed).items():
        pairs = []
        for row in rows:
            user, good = row["messages"]
            bad = _word(rng)
            while bad == good["content"]:
                bad = _word(rng)
            pairs.append({"chosen": [user, good], "rejected": [user, {"role": "assistant", "content": bad}]})
        out[split] = pairs
    return out


def capitals(n_train: int = 1000, n_test: int = 100, seed: int = 3) -> dict[str, list[dict]]:
    """Pairs teaching a preference the reversal SFT data never shows: the reversed word in capitals is
    chosen, the same reversal in lowercase (what SFT learns to write) rejected (implicit prompt)."""
    out: dict[str, list[dict]] = {}
    for split, rows in splits(n_train, n_test, seed).items():
        pairs = []
        for row in rows:
            user, answer = row["messages"]
            upper = {"role": "assistant", "content": answer["content"].upper()}
            pairs.append({"chosen": [user, upper], "rejected": [user, answer]})
        out[split] = pairs
    return out


# Where a word's first letter falls in the alphabet: three classes a tiny classifier can learn.
CLASSES = {"early": "abcdefgh", "middle": "ijklmnop", "late": "qrstuvwxyz"}


def classes(n_train: int = 1500, n_test: int = 300, seed: int = 2) -> dict[str, list[dict]]:
    """`text` (a word) and `label` (a class name), for a classifier; train and test words disjoint."""
    first = {letter: name for name, letters in CLASSES.items() for letter in letters}
    return {
        split: [
            {"text": (w := row["messages"][0]["content"].split()[-1]), "label": first[w[0]]} for row in rows
        ]
        for split, rows in splits(n_train, n_test, seed).items()
    }


def _write(folder: Path, data: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def write(root: Path) -> None:
    """`<root>/reverse/` (SFT), `<root>/preference/` (reward pairs), `<root>/capitals/` (DPO / KTO pairs),
    `<root>/classify/` (labelled words)."""
    _write(root / "reverse", splits())
    _write(root / "preference", preferences())
    _write(root / "capitals", capitals())
    _write(root / "classify", classes())


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"))
