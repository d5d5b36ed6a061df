"""Blind A/B items from two `ncppo sample` folders, the questions, and each annotator's order and layout.

An item is one (prompt, seed) that both folders hold. Which folder's image is shown on the left,
and the order of an annotator's items, are fixed by a SHA-256 of (shuffle seed, annotator, item):
deterministic for a given seed (so a resumed session shows the same layout), independent between
annotators, and unchanged for the other items when items are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..evaluate.compare import check_matching
from ..evaluate.sample import INDEX_FILE, read_index

# id -> the question shown on the page (the paper's three human-evaluation questions)
QUESTIONS: dict[str, str] = {
    "general": "Which image do you prefer overall?",
    "visual": "Which image is more visually appealing?",
    "alignment": "Which image follows the prompt better?",
}


@dataclass(frozen=True)
class Item:
    key: str  # "<prompt_index>-<seed>": the item's id in URLs and on the page
    prompt: str
    prompt_index: int
    seed: int
    file_a: Path  # resolved image paths, checked to lie inside their folders
    file_b: Path


def item_key(prompt_index: int, seed: int) -> str:
    return f"{int(prompt_index)}-{int(seed)}"


def _inside(folder: Path, relative: str, where: str) -> Path:
    """`folder / relative` resolved; refuses files outside `folder` (a crafted index must not serve /etc/passwd)."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{where}: image {relative!r} lies outside {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {relative!r} not found ({path})")
    return path


def _table(folder: Path) -> dict[tuple[int, int], dict]:
    table = {}
    for n, row in enumerate(read_index(folder), 1):
        where = f"{folder / INDEX_FILE}, line {n}"
        try:
            key = (int(row["prompt_index"]), int(row["seed"]))
            prompt, file = str(row["prompt"]), str(row["file"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: needs prompt, prompt_index, seed and file ({err!r})") from None
        if key in table:
            raise ValueError(f"{where}: prompt {key[0]} seed {key[1]} appears twice")
        table[key] = dict(prompt=prompt, file=file, where=where)
    if not table:
        raise ValueError(f"{folder / INDEX_FILE}: no images")
    return table


def load_items(dir_a: str | Path, dir_b: str | Path) -> list[Item]:
    """The items both folders hold, in (prompt_index, seed) order. Refuses folders whose prompts or
    seeds differ (naming the first difference), index rows naming missing files or files outside
    the folder."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    a, b = _table(dir_a), _table(dir_b)
    items = []
    for pi, seed in check_matching(a, b, str(dir_a), str(dir_b)):
        ra, rb = a[(pi, seed)], b[(pi, seed)]
        items.append(Item(item_key(pi, seed), ra["prompt"], pi, seed,
                          _inside(dir_a, ra["file"], ra["where"]), _inside(dir_b, rb["file"], rb["where"])))
    return items


def _hash(*parts) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()


def left_side(key: str, annotator: str, shuffle_seed: int) -> str:
    """Which model ("a" or "b") this annotator sees on the left for item `key`."""
    return "a" if _hash(shuffle_seed, "left", annotator, key)[0] & 1 == 0 else "b"


def annotator_order(items: list[Item], annotator: str, shuffle_seed: int) -> list[Item]:
    """This annotator's order of the items: a seeded shuffle independent of other annotators."""
    return sorted(items, key=lambda it: _hash(shuffle_seed, "order", annotator, it.key))
