"""`ncppo data check`: one streaming pass over a pair source that counts what training would trip on.

Errors (rows training cannot use): missing label_0 or one outside [0, 1], undecodable/empty/missing
images (soft labels strictly between 0 and 1 are valid: counted in `soft_labels`, not flagged).
Warnings (usable rows worth a look): ties, unusual image modes, empty or over-long captions,
duplicate pairs, a pair showing the same image twice, label_1 != 1 - label_0, images smaller than
the training resolution. Training applies the same per-row checks lazily (skip and count).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..configs import option
from .pairs import BadRowError, PairTable, image_name, is_soft_label, open_pairs, parse_label

ERROR_KINDS = ("bad_label", "undecodable_image", "empty_image", "missing_image")
WARNING_KINDS = ("tie", "unusual_mode", "empty_caption", "long_caption", "duplicate_pair", "same_image_twice",
                 "label_1_mismatch", "small_image")
# CLIP's pre-tokenizer pieces (words, single digits, punctuation runs): each is >= 1 BPE token, so the
# count is a lower bound of the CLIP token count. 75 = 77 - start and end tokens.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.IGNORECASE)
CLIP_MAX_CAPTION_TOKENS = 75


def count_caption_tokens(caption: str, tokenizer=None) -> int:
    """Tokens of a caption without start/end tokens: exact with a tokenizer, else CLIP's
    pre-tokenizer piece count (a lower bound)."""
    if tokenizer is not None:
        return len(tokenizer(caption, add_special_tokens=False).input_ids)
    return len(_CLIP_PIECES.findall(caption.lower()))


@dataclass
class CheckReport:
    source: str
    rows: int = 0
    prompts: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ERROR_KINDS + WARNING_KINDS})
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error_rows: int = 0
    modes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # most common "WxH"
    short_side: dict[str, int] = field(default_factory=dict)  # histogram of min(h, w)
    labels: dict[str, int] = field(default_factory=dict)  # hard values; soft ones in two bins (see SOFT_BINS)
    soft_labels: int = 0  # valid labels other than 0, 0.5, 1

    @property
    def error_rate(self) -> float:
        return self.error_rows / self.rows if self.rows else 0.0

    def first_errors(self, n: int = 10) -> list[dict[str, Any]]:
        found = [e for k in ERROR_KINDS for e in self.examples.get(k, [])]
        return sorted(found, key=lambda e: e["row"])[:n]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "prompts": self.prompts, "error_rows": self.error_rows,
                "error_rate": self.error_rate, "errors": {k: self.counts[k] for k in ERROR_KINDS},
                "warnings": {k: self.counts[k] for k in WARNING_KINDS}, "labels": self.labels,
                "soft_labels": self.soft_labels,
                "modes": self.modes, "sizes": self.sizes, "short_side": self.short_side, "examples": self.examples}

    def summary(self) -> str:
        lines = [f"{self.source}: {self.rows} rows, {self.prompts} prompts, {self.error_rows} rows with errors "
                 f"({100 * self.error_rate:.2f}%)"]
        for title, kinds in (("errors", ERROR_KINDS), ("warnings", WARNING_KINDS)):
            for k in kinds:
                if self.counts[k]:
                    rows = ", ".join(str(e["row"]) for e in self.examples.get(k, [])[:5])
                    lines.append(f"  {title[:-1]:7s} {k:18s} {self.counts[k]:8d}   e.g. rows {rows}")
        if self.soft_labels:
            lines.append(f"  soft labels (in (0, 1), trained as conservative targets): {self.soft_labels}")
        lines.append("  modes: " + ", ".join(f"{m} {n}" for m, n in self.modes.items()))
        lines.append("  shorter side: " + ", ".join(f"{b} {n}" for b, n in self.short_side.items()))
        lines.append("  sizes (top): " + ", ".join(f"{s} {n}" for s, n in list(self.sizes.items())[:8]))
        return "\n".join(lines)


SHORT_SIDE_BINS = (0, 256, 512, 768, 1024)
SOFT_BINS = ("soft (0, 0.5)", "soft (0.5, 1)")  # label counts of soft labels: image 1 / image 0 preferred


def _bin(short: int) -> str:
    lo = max(b for b in SHORT_SIDE_BINS if b <= short)
    nxt = [b for b in SHORT_SIDE_BINS if b > lo]
    return f"{lo}-{nxt[0] - 1}" if nxt else f">={lo}"


def check_pairs(source: str | PairTable, *, split: str = "train", image_dir: str | None = None,
                resolution: int | None = None, max_caption_tokens: int = CLIP_MAX_CAPTION_TOKENS,
                tokenizer=None, max_examples: int = 20, limit: int | None = None, batch_size: int = 64,
                progress: bool = True) -> CheckReport:
    """Scan every row once (streaming) and return the counts with example rows of each issue."""
    table = source if isinstance(source, PairTable) else open_pairs(source, split=split, image_dir=image_dir)
    report = CheckReport(table.source)
    counts, modes, sizes, short, labels = report.counts, Counter(), Counter(), Counter(), Counter()
    prompts: set[str] = set()
    seen_pairs: dict[tuple, int] = {}
    columns = list(dict.fromkeys([table.caption_column, "label_0", *table.image_columns,
                                  *(table.uid_columns or ()),
                                  *(["label_1"] if "label_1" in table.column_names else [])]))
    total = len(table) if limit is None else min(limit, len(table))

    def note(kind: str, row: int, detail: str) -> None:
        counts[kind] += 1
        bucket = report.examples.setdefault(kind, [])
        if len(bucket) < max_examples:
            bucket.append({"row": row, "detail": detail})

    bar = tqdm(total=total, desc="check", unit="row", disable=not progress)
    for start, batch in table.iter_batches(columns, batch_size):
        n = len(batch["label_0"])
        for j in range(min(n, total - start)):
            row = start + j
            values = {c: batch[c][j] for c in columns}
            has_error = False
            caption = "" if values[table.caption_column] is None else str(values[table.caption_column])
            prompts.add(caption)
            label = parse_label(values["label_0"])
            if is_soft_label(label):
                report.soft_labels += 1
                labels[SOFT_BINS[label > 0.5]] += 1
            else:
                labels[str(label if label is not None else values["label_0"])] += 1
            if label is None:
                note("bad_label", row, f"label_0 {values['label_0']!r} is not a number in [0, 1]")
                has_error = True
            elif label == 0.5:
                note("tie", row, "label_0 0.5")
            if "label_1" in values and label is not None:
                l1 = parse_label(values["label_1"])
                if l1 is None or abs(l1 - (1 - label)) > 1e-6:
                    note("label_1_mismatch", row, f"label_0 {label} but label_1 {values['label_1']!r}")
            if not caption.strip():
                note("empty_caption", row, "empty caption")
            else:
                n_tok = count_caption_tokens(caption, tokenizer)
                if n_tok > max_caption_tokens:
                    note("long_caption", row, f"{n_tok} tokens > {max_caption_tokens} (truncated in training)")
            digests = []
            for k in (0, 1):
                try:
                    data = table.image_bytes(row, k, values[table.image_columns[k]])
                except BadRowError as err:
                    kind = "missing_image" if "not found" in err.reason or "missing" in err.reason else "empty_image"
                    note(kind, row, err.reason)
                    has_error = True
                    continue
                except OSError as err:
                    note("missing_image", row, f"image {k}: {err}")
                    has_error = True
                    continue
                digests.append(hashlib.blake2b(data, digest_size=16).digest())
                try:
                    img = table.decode(row, k, data, name=image_name(values[table.image_columns[k]]))
                except BadRowError as err:
                    note("empty_image" if "zero size" in err.reason else "undecodable_image", row, err.reason)
                    has_error = True
                    continue
                modes[img.mode] += 1
                if img.mode != "RGB":
                    note("unusual_mode", row, f"image {k} mode {img.mode}")
                w, h = img.size
                sizes[f"{w}x{h}"] += 1
                short[_bin(min(w, h))] += 1
                if resolution and min(w, h) < resolution:
                    note("small_image", row, f"image {k} is {w}x{h}, shorter side < {resolution} (upscaled)")
            if len(digests) == 2:
                if digests[0] == digests[1]:
                    note("same_image_twice", row, "image 0 and image 1 are byte-identical")
                # the same comparison with the images swapped and the label flipped is a duplicate too
                if label is not None and label != 0.5:
                    key = (caption, *(digests if label > 0.5 else digests[::-1]), round(max(label, 1 - label), 6))
                else:
                    key = (caption, *sorted(digests), label)
                if key in seen_pairs:
                    note("duplicate_pair", row, f"same prompt, images and label as row {seen_pairs[key]}")
                else:
                    seen_pairs[key] = row
            report.error_rows += has_error
            report.rows += 1
        bar.update(min(n, total - start))
        if start + n >= total:
            break
    bar.close()
    report.prompts = len(prompts)
    report.modes = dict(modes.most_common())
    report.sizes = dict(sizes.most_common(20))
    report.short_side = {b: short[b] for b in sorted(short, key=lambda s: int(s.split("-")[0].lstrip(">=")))}
    report.labels = dict(sorted(labels.items()))
    return report




@dataclass
class CheckConfig:
    """Flags of `ncppo data check`."""

    data: str = field(metadata={"help": "Pair source: datasets id or save_to_disk folder, parquet/arrow file or "
                                        "folder, CSV/JSONL naming image files.", "cli": False})
    split: str = option("train", "Split to read (datasets ids, save_to_disk dicts, folders with split-named shards).")
    image_dir: str | None = option(None, "Image folder for CSV/JSONL sources (default: the file's folder and its images/).")
    resolution: int | None = option(None, "Training resolution: count images whose shorter side is smaller (upscaled).")
    max_caption_tokens: int = option(CLIP_MAX_CAPTION_TOKENS, "Captions with more tokens are reported as long (CLIP "
                                 "keeps 75 + start/end). Without --tokenizer, tokens are approximated by CLIP's "
                                 "pre-tokenizer pieces (words, digits, punctuation runs), a lower bound.")
    tokenizer: str | None = option(None, "Count caption tokens exactly with this tokenizer: a pipeline folder/hub id "
                                     "(its tokenizer/ subfolder) or a tokenizer folder.")
    max_error_rate: float = option(0.0, "Exit with status 1 when the share of rows with errors exceeds this.")
    json: str | None = option(None, "Also write the full report as JSON to this path ('-' for stdout).")
    max_examples: int = option(20, "Example rows kept per issue kind.")
    limit: int | None = option(None, "Check only the first N rows.")

    def validate(self) -> None:
        from ..configs import ConfigError

        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


def load_tokenizer(name: str):
    """A tokenizer from a pipeline (tokenizer/ subfolder) or a tokenizer folder/hub id."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if Path(name).is_dir() and (Path(name) / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
    return AutoTokenizer.from_pretrained(name)


def run_check(config: CheckConfig, *, progress: bool = True) -> tuple[CheckReport, int]:
    """Run the check, print the summary (and JSON), return (report, exit status)."""
    import json
    import sys

    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    report = check_pairs(config.data, split=config.split, image_dir=config.image_dir, resolution=config.resolution,
                         max_caption_tokens=config.max_caption_tokens, tokenizer=tokenizer,
                         max_examples=config.max_examples, limit=config.limit, progress=progress)
    print(report.summary(), file=sys.stderr if config.json == "-" else sys.stdout)
    if config.json:
        text = json.dumps(report.to_dict(), indent=2)
        if config.json == "-":
            print(text)
        else:
            with open(config.json, "w") as fh:
                fh.write(text + "\n")
    status = 0
    if report.error_rate > config.max_error_rate:
        first = "; ".join(f"row {e['row']}: {e['detail']}" for e in report.first_errors(5))
        print(f"error: {report.error_rows} of {report.rows} rows ({100 * report.error_rate:.2f}%) have errors, "
              f"more than --max-error-rate {config.max_error_rate}. First: {first}", file=sys.stderr)
        status = 1
    return report, status
