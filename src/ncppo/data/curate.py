"""`ncppo data curate`: filter pairs into a new parquet dataset in the source's schema.

Rules (METHOD.md section 4):
  * absolute-winners: per prompt, an image is an absolute winner when, over all that prompt's
    comparisons, it has >= 1 win, 0 losses and 0 ties (a soft label > 0.5 is a win of image 0,
    < 0.5 a win of image 1, 0.5 a tie). Which pairs are then kept (`--pairs`):
      direct              every pair whose winner is an absolute winner ("winner vs its losers"; default)
      latest              only the last such pair (in row order) of each absolute winner
      add-loser-losers    direct + the pairs in which a loser of an absolute winner beat another image
      add-losers-of-loser direct + new pairs (absolute winner, an image its loser beat), written winner first
  * drop-ties: every pair with a label other than 0.5.
  * none: every pair with a valid label (with --dedupe: only removes duplicates).
Images are identified by their uid columns when present, else by their path, else by a hash of
their bytes. Rows with a label missing or outside [0, 1] are dropped and counted; kept rows keep
their label values (soft ones too).

Two streaming passes, so data larger than memory works: pass 1 keeps per-image tallies (about
150 bytes per distinct image; the add-* variants also keep the win graph, ~100 bytes per pair);
pass 2 writes the kept rows in parquet shards of --shard-rows rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..configs import option
from ..errors import InputError, OutputExistsError
from .pairs import BadRowError, PairTable, _TableBackend, open_pairs, parse_label

MAX_EXAMPLES = 20  # bad rows named in stats.json


def _path_based(table: PairTable) -> bool:
    """Whether the images are files named by path/uid (else encoded bytes stored in the source)."""
    import pyarrow as pa

    kind = table.schema.field(table.image_columns[0]).type
    return table.image_kind == "uid" or pa.types.is_string(kind) or pa.types.is_large_string(kind)

RULES = ("absolute-winners", "drop-ties", "none")
PAIR_VARIANTS = ("direct", "latest", "add-loser-losers", "add-losers-of-loser")




@dataclass
class CurateConfig:
    """Flags of `ncppo data curate`."""

    data: str = field(metadata={"help": "Pair source to filter (any source `ncppo train --data` reads except a "
                                        "latent cache).", "cli": False})
    out: str = field(metadata={"help": "Output folder: train-XXXXX-of-YYYYY.parquet shards and stats.json."})
    rule: str = option("absolute-winners", "Which pairs to keep: absolute-winners (paper, section 4), drop-ties, "
                                       "or none (only --dedupe applies).", choices=RULES)
    pairs: str = option("direct", "absolute-winners only: direct (every pair of an absolute winner), latest (its last "
                              "pair), add-loser-losers (+ pairs its losers won), add-losers-of-loser (+ new pairs "
                              "winner vs the images its losers beat). See docs/data.md.", choices=PAIR_VARIANTS)
    dedupe: bool = option(False, "Drop repeated comparisons (same prompt, same two images, same outcome; first kept).")
    split: str = option("train", "Split to read.")
    image_dir: str | None = option(None, "Image folder for CSV/JSONL sources (output rows get absolute image paths).")
    chunk_rows: int = option(1000, "Rows read per streaming chunk (memory ~ chunk x row size).")
    shard_rows: int = option(5000, "Rows per output parquet shard.")
    overwrite: bool = option(False, "Replace an existing output folder.")

    def validate(self) -> None:
        from ..configs import ConfigError

        for name in ("chunk_rows", "shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def _key(caption: str, image_id: str) -> bytes:
    return hashlib.blake2b(f"{caption}\0{image_id}".encode(), digest_size=16).digest()


@dataclass
class _Row:
    row: int
    values: dict[str, Any]
    caption: str
    label: float | None
    keys: tuple[bytes, bytes]

    @property
    def winner(self) -> bytes:
        return self.keys[0] if self.label > 0.5 else self.keys[1]

    @property
    def loser(self) -> bytes:
        return self.keys[1] if self.label > 0.5 else self.keys[0]

    def comparison(self) -> tuple:
        """The outcome: who won, and with which probability (so 0.8 and 1 are different outcomes)."""
        if self.label == 0.5:
            return (self.caption, "tie", *sorted(self.keys))
        return (self.caption, self.winner, self.loser, round(max(self.label, 1 - self.label), 6))


class _Curator:
    """The two passes; `batches()` must yield the same rows in the same order each time."""

    def __init__(self, table: PairTable, batches: Callable[[list[str]], Iterable[tuple[int, dict]]], *,
                 rule: str, pairs: str, dedupe: bool, progress: bool):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if pairs not in PAIR_VARIANTS:
            raise ValueError(f"pairs must be one of {PAIR_VARIANTS}, got {pairs!r}")
        self.table, self.batches = table, batches
        self.rule, self.pairs, self.dedupe, self.progress = rule, pairs, dedupe, progress
        self.need_ids = rule != "none" or dedupe  # image identities (hashing bytes) only when used
        self.path_based = _path_based(table)
        self.id_columns = list(table.uid_columns or table.image_columns) if self.need_ids else []
        if self.path_based:  # the files are checked in both passes, so both keep the same rows
            self.id_columns += list(table.image_columns)
        if "label_1" in table.column_names:
            self.id_columns.append("label_1")
        self.bad_rows = 0
        self.bad_examples: list[dict[str, Any]] = []

    def _bad(self, row: int, detail: str) -> None:
        self.bad_rows += 1
        if len(self.bad_examples) < MAX_EXAMPLES:
            self.bad_examples.append({"row": row, "detail": detail})

    def _check(self, row: int, values: dict) -> tuple[bytes, bytes] | None:
        """The image keys of a row (None when not needed); BadRowError for a row that cannot be used."""
        if "label_1" in values and values["label_1"] is not None and parse_label(values["label_1"]) is None:
            raise BadRowError(row, self.table.source, f"label_1 {values['label_1']!r} is not a number in [0, 1]")
        if self.path_based:
            for k in (0, 1):
                value = values[self.table.image_columns[k]]
                if value is None or not str(value).strip():
                    raise BadRowError(row, self.table.source,
                                      f"image {k} is missing (empty {self.table.image_columns[k]})")
                self.table.resolve_path(row, k, str(value))
        if not self.need_ids:
            return None
        return tuple(self.table.image_id(row, k, values) for k in (0, 1))

    def _rows(self, columns: list[str], desc: str) -> Iterator[_Row]:
        """Rows with a valid label, duplicates removed when --dedupe (same decision in both passes)."""
        seen: set[bytes] = set()
        self.bad_labels = self.duplicates = self.bad_rows = 0
        self.bad_examples = []
        bar = tqdm(total=len(self.table), desc=desc, unit="row", disable=not self.progress)
        cols = list(dict.fromkeys([self.table.caption_column, "label_0", *self.id_columns, *columns]))
        for start, batch in self.batches(cols):
            n = len(batch["label_0"])
            for j in range(n):
                values = {c: batch[c][j] for c in cols}
                caption = "" if values[self.table.caption_column] is None else str(values[self.table.caption_column])
                label = parse_label(values["label_0"])
                if label is None:
                    self.bad_labels += 1
                    continue
                try:
                    ids = self._check(start + j, values)
                except BadRowError as err:
                    self._bad(start + j, err.reason)
                    continue
                keys = (_key(caption, ids[0]), _key(caption, ids[1])) if ids else (b"", b"")
                row = _Row(start + j, values, caption, label, keys)
                if self.dedupe:
                    digest = hashlib.blake2b(repr(row.comparison()).encode(), digest_size=16).digest()
                    if digest in seen:
                        self.duplicates += 1
                        continue
                    seen.add(digest)
                yield row
            bar.update(n)
        bar.close()

    # ---- pass 1
    def tally(self) -> None:
        tallies: dict[bytes, list[int]] = {}
        self.last_win: dict[bytes, int] = {}
        self.beats: dict[bytes, list[bytes]] = {}
        need_graph = self.pairs in ("add-loser-losers", "add-losers-of-loser")
        prompts: set[bytes] = set()
        self.rows_before = self.ties = 0
        for r in self._rows([], "curate pass 1/2"):
            self.rows_before += 1
            prompts.add(hashlib.blake2b(r.caption.encode(), digest_size=16).digest())
            t0, t1 = (tallies.setdefault(k, [0, 0, 0]) for k in r.keys)
            if r.label == 0.5:
                self.ties += 1
                t0[2] += 1
                t1[2] += 1
                continue
            tallies[r.winner][0] += 1
            tallies[r.loser][1] += 1
            self.last_win[r.winner] = r.row
            if need_graph:
                self.beats.setdefault(r.winner, []).append(r.loser)
        self.prompts_before = len(prompts)
        self.images = len(tallies)
        self.bad_labels_before, self.duplicates_before = self.bad_labels, self.duplicates
        self.bad_rows_before = self.bad_rows
        if not self.need_ids:
            self.images = None  # --rule none without --dedupe does not identify images
        self.absolute = {k for k, (w, l, t) in tallies.items() if w >= 1 and l == 0 and t == 0}
        self.second = set()
        self.synthetic: list[tuple[bytes, bytes]] = []
        if self.pairs == "add-loser-losers":
            self.second = {l for w in self.absolute for l in self.beats.get(w, [])}
        if self.pairs == "add-losers-of-loser":
            for w in sorted(self.absolute, key=lambda k: self.last_win[k]):
                direct = set(self.beats.get(w, []))
                for l in dict.fromkeys(self.beats.get(w, [])):
                    for l2 in dict.fromkeys(self.beats.get(l, [])):
                        if l2 not in direct and l2 != w and (w, l2) not in self.synthetic:
                            self.synthetic.append((w, l2))
        self.latest_rows = {self.last_win[w] for w in self.absolute}

    def keep(self, r: _Row) -> bool:
        if self.rule == "none":
            return True
        if r.label == 0.5:
            return False
        if self.rule == "drop-ties":
            return True
        if self.pairs == "latest":
            return r.row in self.latest_rows
        return r.winner in self.absolute or r.winner in self.second

    # ---- pass 2
    def write(self, sink: _Sink, spill_dir: Path | None) -> dict[str, Any]:
        needed = {k for pair in self.synthetic for k in pair}
        captured: dict[bytes, dict[str, Any]] = {}
        kept, prompts = 0, set()
        columns = self.table.column_names
        failed: dict[bytes, tuple[int, str]] = {}
        for r in self._rows(columns, "curate pass 2/2"):
            for k in (0, 1):
                if r.keys[k] in needed and r.keys[k] not in captured and r.keys[k] not in failed:
                    try:
                        captured[r.keys[k]] = self._capture(r, k, spill_dir)
                    except BadRowError as err:
                        failed[r.keys[k]] = (r.row, err.reason)
            if self.keep(r):
                sink.add(sink.output_row(r.row, r.values))
                kept += 1
                prompts.add(r.caption)
        bad_rows, examples = self.bad_rows_before, self.bad_examples
        synthesized = 0
        for w, l2 in self.synthetic:
            if w not in captured or l2 not in captured:  # an image that cannot be read: no pair made of it
                row, reason = failed[w if w not in captured else l2]
                bad_rows += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"row": row, "detail": f"synthesized pair skipped: {reason}"})
                continue
            synthesized += 1
            a, b = captured[w], captured[l2]
            sink.add(sink.synthetic_row(a, b))
            kept += 1
            prompts.add(a["caption"])
        sink.close()
        return {"rows_before": self.rows_before + self.bad_labels_before + self.duplicates_before + self.bad_rows_before,
                "valid_rows_before": self.rows_before, "prompts_before": self.prompts_before,
                "rows_after": kept, "prompts_after": len(prompts), "ties": self.ties,
                "bad_labels": self.bad_labels_before, "duplicates_dropped": self.duplicates_before,
                "images": self.images, "absolute_winners": len(self.absolute),
                "synthesized_pairs": synthesized, "bad_rows": bad_rows, "bad_row_examples": examples,
                "rule": self.rule,
                "pairs": self.pairs if self.rule == "absolute-winners" else None, "dedupe": self.dedupe,
                "source": self.table.source, "shards": sink.shard_names}

    def _capture(self, r: _Row, k: int, spill_dir: Path | None) -> dict[str, Any]:
        """Image k of row r for a synthesized pair: bytes go to a spill file, paths stay paths."""
        value = r.values[self.table.image_columns[k]]
        uid = r.values.get(self.table.uid_columns[k]) if self.table.uid_columns else None
        entry = {"caption": r.caption, "uid": uid, "row": r.row, "k": k}
        if isinstance(value, str) or self.table.image_kind == "uid":
            entry["path"] = str(self.table.resolve_path(r.row, k, str(value)).resolve())
        else:
            data = self.table.image_bytes(r.row, k, value)  # BadRowError for a null or empty image
            if spill_dir is None:
                entry["value"] = value
            else:
                path = spill_dir / f"{r.keys[k].hex()}.bin"
                path.write_bytes(data)
                entry["spill"] = path
        return entry


class _Sink:
    """Turns kept rows into output rows in the source schema; collects or writes them."""

    def __init__(self, table: PairTable):
        import pyarrow as pa

        self.table = table
        schema = table.schema
        self.path_based = _path_based(table)
        fields = []
        for f in schema:
            if f.name in ("label_0", "label_1") and not pa.types.is_floating(f.type):
                f = pa.field(f.name, pa.float64())
            fields.append(f)
        if self.path_based:
            fields = [f for f in fields if f.name not in ("image_0", "image_1")]
            fields += [pa.field("image_0", pa.string()), pa.field("image_1", pa.string())]
        self.schema = pa.schema(fields, metadata=schema.metadata)
        self.shard_names: list[str] = []

    def output_row(self, row: int, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        for name in ("label_0", "label_1"):
            if name in out and out[name] is not None:
                out[name] = parse_label(out[name]) if parse_label(out[name]) is not None else float(out[name])
        if self.path_based:
            for k in (0, 1):
                value = values[self.table.image_columns[k]]
                out[f"image_{k}"] = str(self.table.resolve_path(row, k, str(value)).resolve())
        return out

    def synthetic_row(self, winner: dict[str, Any], loser: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        out: dict[str, Any] = {name: None for name in self.schema.names}
        out[self.table.caption_column] = winner["caption"]
        out["label_0"] = 1.0
        if "label_1" in out:
            out["label_1"] = 0.0
        if self.table.uid_columns:
            out["image_0_uid"], out["image_1_uid"] = winner["uid"], loser["uid"]
        for k, entry in enumerate((winner, loser)):
            if self.path_based:
                out[f"image_{k}"] = entry["path"]
            else:
                value = entry["value"] if "value" in entry else Path(entry["spill"]).read_bytes()
                column = self.table.image_columns[k]
                if pa.types.is_struct(self.schema.field(column).type):
                    value = {"bytes": value if isinstance(value, bytes) else value.get("bytes"), "path": None}
                out[column] = value
        return out

    def add(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ListSink(_Sink):
    def __init__(self, table: PairTable):
        super().__init__(table)
        self.rows: list[dict[str, Any]] = []

    def add(self, row):
        self.rows.append(row)


class ParquetShardSink(_Sink):
    """Writes rows into `train-XXXXX-of-YYYYY.parquet` shards of `shard_rows` rows."""

    def __init__(self, table: PairTable, out: Path, shard_rows: int, row_group_rows: int = 256):
        super().__init__(table)
        self.out, self.shard_rows, self.row_group_rows = out, shard_rows, row_group_rows
        self.buffer: list[dict[str, Any]] = []
        self.parts: list[Path] = []
        self.writer = None
        self.in_shard = 0

    def add(self, row):
        self.buffer.append(row)
        if len(self.buffer) >= min(self.row_group_rows, self.shard_rows - self.in_shard):
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        if self.writer is None:
            path = self.out / f"part-{len(self.parts):05d}.parquet"
            self.parts.append(path)
            self.writer = pq.ParquetWriter(path, self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.in_shard += len(self.buffer)
        self.buffer = []
        if self.in_shard >= self.shard_rows:
            self.writer.close()
            self.writer, self.in_shard = None, 0

    def close(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush()
        if self.writer is not None:
            self.writer.close()
        if not self.parts:  # nothing kept: still write an empty shard with the schema
            path = self.out / "part-00000.parquet"
            pq.write_table(pa.Table.from_pylist([], schema=self.schema), path)
            self.parts.append(path)
        n = len(self.parts)
        for i, part in enumerate(self.parts):
            name = f"train-{i:05d}-of-{n:05d}.parquet"
            part.rename(self.out / name)
            self.shard_names.append(name)


def curate_table(table: PairTable, *, rule: str = "absolute-winners", pairs: str = "direct", dedupe: bool = False,
                 batch_size: int = 1000, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """In-memory curation: (kept rows as dicts in the source schema, stats)."""
    curator = _Curator(table, lambda cols: table.iter_batches(cols, batch_size), rule=rule, pairs=pairs,
                       dedupe=dedupe, progress=progress)
    curator.tally()
    sink = ListSink(table)
    stats = curator.write(sink, None)
    return sink.rows, stats


def curate_rows(rows: list[dict[str, Any]], **kwargs) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`curate_table` over a list of Pick-a-Pic-schema row dicts."""
    import pyarrow as pa

    return curate_table(PairTable(_TableBackend(pa.Table.from_pylist(rows), "<rows>")), **kwargs)


def check_out_apart(out: str | Path, *inputs: tuple[Any, str]) -> None:
    """Refuse an --out that is an input, holds one or lies inside one (--overwrite would delete it,
    and the output would be read back as input). `inputs`: (path or hub id or None, what it is)."""
    target = Path(out).resolve()
    for value, what in inputs:
        if value is None or not isinstance(value, (str, Path)) or not Path(value).exists():
            continue  # a hub id or an unnamed source
        src = Path(value).resolve()
        if target == src or target in src.parents or src in target.parents:
            where = "is" if target == src else "contains" if target in src.parents else "lies inside"
            raise InputError(f"--out {out} {where} {what} {value}; write the output elsewhere")


def curate(source, out: str | Path, *, rule: str = "absolute-winners", pairs: str = "direct", dedupe: bool = False,
           split: str = "train", image_dir: str | None = None, chunk_rows: int = 1000, shard_rows: int = 5000,
           overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Stream `source` twice and write the kept pairs as parquet shards + stats.json under `out`."""
    table = source if isinstance(source, PairTable) else open_pairs(source, split=split, image_dir=image_dir)
    out = Path(out)
    check_out_apart(out, (source.source if isinstance(source, PairTable) else source, "the source"),
                    (image_dir, "--image-dir"))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"--out {out} exists and is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    curator = _Curator(table, lambda cols: table.iter_batches(cols, chunk_rows), rule=rule, pairs=pairs,
                       dedupe=dedupe, progress=progress)
    curator.tally()
    spill = out / ".spill"
    spill.mkdir(exist_ok=True)
    try:
        stats = curator.write(ParquetShardSink(table, out, shard_rows), spill)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def run_curate(config: CurateConfig, *, progress: bool = True) -> tuple[dict[str, Any], int]:
    """`ncppo data curate`: curate and print the before/after counts."""
    stats = curate(config.data, config.out, rule=config.rule, pairs=config.pairs, dedupe=config.dedupe,
                   split=config.split, image_dir=config.image_dir, chunk_rows=config.chunk_rows,
                   shard_rows=config.shard_rows, overwrite=config.overwrite, progress=progress)
    print(f"{stats['source']}: kept {stats['rows_after']} of {stats['rows_before']} rows, "
          f"{stats['prompts_after']} of {stats['prompts_before']} prompts ({config.rule}"
          f"{', ' + config.pairs if config.rule == 'absolute-winners' else ''}) -> {config.out}")
    if stats["bad_rows"]:
        rows = ", ".join(str(e["row"]) for e in stats["bad_row_examples"][:5])
        print(f"  skipped {stats['bad_rows']} bad row(s) (e.g. rows {rows}: "
              f"{stats['bad_row_examples'][0]['detail']}); see {Path(config.out) / 'stats.json'}")
    return stats, 0
