"""Readers for preference pairs in the Pick-a-Pic schema, and per-row validation.

Accepted sources (see docs/data.md):
  * a `datasets` hub id, or a `save_to_disk` folder (memory-mapped arrow);
  * parquet files or a folder of parquet shards (streamed with pyarrow; converted once to the
    `datasets` arrow cache the first time random access is needed);
  * `.arrow` files or a folder of them (memory-mapped with `datasets.Dataset.from_file`);
  * CSV or JSONL files whose rows name two image files (`image_0_uid`/`image_1_uid` looked up as
    `<uid>.<ext>`, or `image_0`/`image_1` holding paths), resolved under an image folder.

Columns: caption, label_0 (the probability that image 0 is preferred, in [0, 1]: 1 = image 0, 0 =
image 1, 0.5 = tie, anything between a soft label) and one image column pair: jpg_0/jpg_1
(encoded bytes), image_0/image_1 (bytes, `datasets` Image dicts or paths), or
image_0_uid/image_1_uid (file names without extension).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, MissingInputError

VALID_LABELS = (0.0, 0.5, 1.0)  # the hard labels (and the tie); any value in [0, 1] is a valid (soft) label
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("caption", "prompt")
LABEL_COLUMNS = ("label_0", "label_1")  # JSONL: parsed as labels; any other column is text
# (column of image 0, column of image 1, kind) in order of preference
IMAGE_COLUMN_PAIRS = (("jpg_0", "jpg_1", "value"), ("image_0", "image_1", "value"),
                      ("image_0_uid", "image_1_uid", "uid"))
UID_COLUMNS = ("image_0_uid", "image_1_uid")
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "validation_unique", "test_unique")


class BadRowError(ValueError):
    """A row that cannot be used (undecodable/empty/missing image, bad label)."""

    def __init__(self, row: int, source: str, reason: str):
        self.row, self.source, self.reason = row, source, reason
        super().__init__(f"{source}: row {row}: {reason}")


class PairSchemaError(InputError):
    """A source lacks a required column (the message names the file, the column and what was found)."""


@dataclass(frozen=True)
class PairMeta:
    row: int
    caption: str
    label_0: float | None
    uid_0: str | None = None
    uid_1: str | None = None


@dataclass
class PairRecord:
    row: int
    caption: str
    image_0: Image.Image
    image_1: Image.Image
    label_0: float


# --------------------------------------------------------------------------------------------
# per-value helpers (shared by the dataset, `data check` and `data curate`)

def parse_label(value: Any) -> float | None:
    """The label as a float in [0, 1] (within 1e-6 of 0, 0.5 or 1: exactly that), or None when it is
    missing, not a number, or outside [0, 1]."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(label):
        return None
    for v in VALID_LABELS:
        if abs(label - v) < 1e-6:
            return v
    return label if 0.0 < label < 1.0 else None


def is_soft_label(label: float | None) -> bool:
    """A valid label other than 0, 0.5 and 1."""
    return label is not None and label not in VALID_LABELS


def image_name(value: Any) -> str | None:
    """The file a raw image value names (a path or uid, or a datasets Image's "path"), else None."""
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) and value.strip() else None


def open_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (raises on truncated or unknown data); keeps the mode."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode: alpha is composited on white, 16-bit/float gray is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _caption(value: Any) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# backends: random access + streaming over raw column values

class _Backend:
    num_rows: int
    column_names: list[str]
    source: str
    schema: Any  # pyarrow.Schema of the stored columns

    def take(self, i: int, columns: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def iter_batches(self, columns: Sequence[str], batch_size: int) -> Iterator[dict[str, list]]:
        raise NotImplementedError

    def column(self, name: str) -> list:
        out: list = []
        for batch in self.iter_batches([name], 65536):
            out.extend(batch[name])
        return out


def _undecoded(ds):
    """`datasets` Image/Value columns as raw values (bytes dicts), never decoded PIL images."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


class _HFBackend(_Backend):
    def __init__(self, ds, source: str):
        self.ds = _undecoded(ds)
        self.source = source
        self.num_rows = len(self.ds)
        self.column_names = list(self.ds.column_names)
        self.schema = self.ds.data.schema
        self._views: dict[tuple[str, ...], Any] = {}

    def _view(self, columns):
        key = tuple(columns)
        if key not in self._views:
            self._views[key] = self.ds.select_columns(list(columns))
        return self._views[key]

    def take(self, i, columns):
        return self._view(columns)[int(i)]

    def iter_batches(self, columns, batch_size):
        yield from self._view(columns).iter(batch_size=batch_size)


class _ParquetBackend(_Backend):
    """Streams parquet shards with pyarrow; random access converts once to the `datasets` cache."""

    def __init__(self, files: list[Path], source: str, cache_dir: str | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.files, self.source, self.cache_dir = files, source, cache_dir
        self.num_rows = 0
        names = None
        for f in files:
            try:
                meta = pq.read_metadata(f)
            except Exception as err:
                raise PairSchemaError(f"{f}: not a readable parquet file ({err})") from None
            self.num_rows += meta.num_rows
            file_names = list(meta.schema.to_arrow_schema().names)
            if names is None:
                names = file_names
            elif set(file_names) != set(names):
                raise PairSchemaError(f"{f}: columns {file_names} differ from {files[0]}'s {names}")
        self.column_names = [n for n in (names or []) if not n.startswith("__index_level")]
        full = pq.read_schema(files[0])
        self.schema = pa.schema([full.field(n) for n in self.column_names])
        self._random: _HFBackend | None = None

    def take(self, i, columns):
        if self._random is None:
            import datasets

            ds = datasets.load_dataset("parquet", data_files=[str(f) for f in self.files], split="train",
                                       cache_dir=self.cache_dir)
            self._random = _HFBackend(ds, self.source)
        return self._random.take(i, columns)

    def iter_batches(self, columns, batch_size):
        import pyarrow.parquet as pq

        for f in self.files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
                yield rb.to_pydict()


class _TableBackend(_Backend):
    """An in-memory pyarrow table (CSV/JSONL metadata: captions, labels, file names)."""

    def __init__(self, table, source: str):
        self.table, self.source = table, source
        self.num_rows = table.num_rows
        self.column_names = list(table.column_names)
        self.schema = table.schema

    def take(self, i, columns):
        return self.table.select(list(columns)).slice(int(i), 1).to_pylist()[0]

    def iter_batches(self, columns, batch_size):
        for rb in self.table.select(list(columns)).to_batches(max_chunksize=batch_size):
            yield rb.to_pydict()

    def column(self, name):
        return self.table.column(name).to_pylist()


def _read_csv(path: Path):
    import pyarrow as pa

    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a leading BOM (Excel) is dropped
        reader = csv.DictReader(io.StringIO(_read_utf8(fh, path), newline=""))
        if not reader.fieldnames:
            raise PairSchemaError(f"{path}: empty CSV (no header row)")
        names = [n.strip() for n in reader.fieldnames]
        columns: dict[str, list] = {n: [] for n in names}
        for raw in reader:
            for key, name in zip(reader.fieldnames, names):
                value = raw.get(key)
                columns[name].append(None if value is None else value)
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def _read_jsonl(path: Path):
    import pyarrow as pa

    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(_read_utf8(fh, path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairSchemaError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise PairSchemaError(f"{path}:{n}: expected a JSON object per line")
            rows.append(obj)
    names = list(dict.fromkeys(k for r in rows for k in r))
    # labels stay numbers; everything else is stored as text so mixed types never break arrow
    return pa.table({k: pa.array([_json_cell(r.get(k), k) for r in rows]) for k in names})


def _read_utf8(fh, path: Path) -> str:
    try:
        return fh.read()
    except UnicodeDecodeError as err:
        raise PairSchemaError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def _json_cell(value, key):
    if key in LABEL_COLUMNS:
        return parse_label(value) if value is not None else None
    return None if value is None else str(value)


# --------------------------------------------------------------------------------------------

class PairTable:
    """Random and streaming access to preference pairs of one source.

    `meta(i)` reads caption/label/uids only; `load(i)` decodes both images (RGB) and validates the
    row, raising `BadRowError`. Row ids are positions in the source (files in sorted order).
    """

    def __init__(self, backend: _Backend, image_dirs: Sequence[Path] = ()):
        self._b = backend
        self.source = backend.source
        self.image_dirs = [Path(d) for d in image_dirs]
        names = backend.column_names
        self.caption_column = next((c for c in CAPTION_COLUMNS if c in names), None)
        found = ", ".join(names) or "(none)"
        if self.caption_column is None:
            raise PairSchemaError(f"{self.source}: missing column 'caption' (the prompt; 'prompt' is also "
                                  f"accepted); found columns: {found}")
        if "label_0" not in names:
            raise PairSchemaError(f"{self.source}: missing column 'label_0' (1 = image 0 preferred, 0 = image 1, "
                                  f"0.5 = tie, soft labels in between); found columns: {found}")
        pair = next(((a, b, kind) for a, b, kind in IMAGE_COLUMN_PAIRS if a in names and b in names), None)
        if pair is None:
            raise PairSchemaError(f"{self.source}: missing image columns: need jpg_0/jpg_1 (encoded bytes), "
                                  f"image_0/image_1 (bytes or paths) or image_0_uid/image_1_uid (file names); "
                                  f"found columns: {found}")
        self.image_columns = (pair[0], pair[1])
        self.image_kind = pair[2]
        self.uid_columns = UID_COLUMNS if all(c in names for c in UID_COLUMNS) else None
        self.meta_columns = [self.caption_column, "label_0"] + list(self.uid_columns or ())
        self._ext_hint: str | None = None

    # ---- size and columns
    def __len__(self) -> int:
        return self._b.num_rows

    @property
    def column_names(self) -> list[str]:
        return list(self._b.column_names)

    @property
    def schema(self):
        """pyarrow schema of the source's columns (what `data curate` writes back)."""
        return self._b.schema

    @property
    def has_image_bytes(self) -> bool:
        """True when images are stored in the table (not as file names to look up)."""
        return self.image_kind == "value"

    def __repr__(self):
        return f"PairTable({self.source!r}, rows={len(self)}, images={self.image_columns})"

    # ---- cheap access
    def meta(self, i: int) -> PairMeta:
        """Caption, label and uids of row `i` without reading image bytes."""
        i = self._check_index(i)
        values = self._b.take(i, self.meta_columns)
        return self._meta_from(i, values)

    def _meta_from(self, row: int, values: dict) -> PairMeta:
        uids = (values.get(UID_COLUMNS[0]), values.get(UID_COLUMNS[1])) if self.uid_columns else (None, None)
        return PairMeta(row, _caption(values.get(self.caption_column)), parse_label(values.get("label_0")),
                        *(None if u is None else str(u) for u in uids))

    def labels(self) -> np.ndarray:
        """label_0 of every row as float64 (NaN where missing or outside [0, 1])."""
        raw = self._b.column("label_0")
        return np.array([np.nan if (v := parse_label(x)) is None else v for x in raw], dtype=np.float64)

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 256
                     ) -> Iterator[tuple[int, dict[str, list]]]:
        """Stream (first row id, {column: values}) batches in row order; no random access needed."""
        columns = list(columns) if columns is not None else self.column_names
        start = 0
        for batch in self._b.iter_batches(columns, batch_size):
            n = len(next(iter(batch.values()))) if batch else 0
            yield start, batch
            start += n

    # ---- images
    def load(self, i: int) -> PairRecord:
        """Both images (PIL RGB) with caption and label; raises BadRowError for a bad row."""
        i = self._check_index(i)
        values = self._b.take(i, list(dict.fromkeys(self.meta_columns + list(self.image_columns))))
        return self.record_from_values(i, values)

    def record_from_values(self, row: int, values: dict) -> PairRecord:
        """Validate a row given as {column: raw value} (from `load` or `iter_batches`)."""
        meta = self._meta_from(row, values)
        if meta.label_0 is None:
            raise BadRowError(row, self.source, f"label_0 {values.get('label_0')!r} is not a number in [0, 1]")
        images = [to_rgb(self.decode(row, k, values[self.image_columns[k]])) for k in (0, 1)]
        return PairRecord(row, meta.caption, images[0], images[1], meta.label_0)

    def decode(self, row: int, k: int, value: Any, name: str | None = None) -> Image.Image:
        """Image `k` of `row` from its raw value (or its bytes, read from the file `name`), in its
        original mode (BadRowError if unusable, naming the file when the row names one)."""
        data = self.image_bytes(row, k, value)
        name = name or image_name(value)
        what = f"image {k}" + (f" file {name!r}" if name else "")
        try:
            img = open_image(data)
        except Exception as err:  # PIL names the buffer it read ("<_io.BytesIO object at 0x...>"): dropped
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
            raise BadRowError(row, self.source, f"{what} cannot be decoded ({type(err).__name__}: {reason})") from None
        if img.width == 0 or img.height == 0:
            raise BadRowError(row, self.source, f"{what} has zero size")
        return img

    def image_bytes(self, row: int, k: int, value: Any) -> bytes:
        """The encoded bytes of image `k` of `row` (reads the file for path/uid columns)."""
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue()
        if isinstance(value, dict):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) == 0:
                raise BadRowError(row, self.source, f"image {k} is empty (0 bytes)")
            return bytes(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise BadRowError(row, self.source, f"image {k} is missing (empty {self.image_columns[k]})")
        path = self.resolve_path(row, k, str(value))
        try:
            data = path.read_bytes()
        except OSError as err:  # no permission, a folder, an I/O error: a bad row, not a crashed run
            raise BadRowError(row, self.source, f"image {k} file {path} cannot be read ({err.strerror or err})") from None
        if not data:
            raise BadRowError(row, self.source, f"image {k} file {path} is empty (0 bytes)")
        return data

    def resolve_path(self, row: int, k: int, value: str) -> Path:
        """The file of image `k` named by a path or uid value (BadRowError when not found)."""
        candidates: list[Path] = []
        p = Path(value)
        if p.is_absolute():
            candidates.append(p)
        else:
            for d in self.image_dirs:
                if self.image_kind == "uid" and not p.suffix.lower() in IMAGE_EXTENSIONS:
                    exts = ([self._ext_hint] if self._ext_hint else []) + list(IMAGE_EXTENSIONS)
                    exts += [e.upper() for e in IMAGE_EXTENSIONS]
                    candidates.extend(d / (value + e) for e in dict.fromkeys(exts))
                candidates.append(d / p)
        for c in candidates:
            if c.is_file():
                if self.image_kind == "uid" and c.suffix and c.name != p.name:
                    self._ext_hint = c.suffix
                return c
        where = ", ".join(str(d) for d in self.image_dirs) if not p.is_absolute() else str(p.parent)
        hint = " (tried extensions " + "/".join(IMAGE_EXTENSIONS) + ")" if self.image_kind == "uid" else ""
        raise BadRowError(row, self.source, f"image {k} file {value!r} not found under {where}{hint}")

    def image_id(self, row: int, k: int, values: dict) -> str:
        """A stable identity for image `k` of a row: its uid, its path, or a hash of its bytes."""
        if self.uid_columns:
            uid = values.get(UID_COLUMNS[k])
            if uid is not None and str(uid) != "":
                return "uid:" + str(uid)
        value = values.get(self.image_columns[k])
        if isinstance(value, str):
            return "path:" + value
        import hashlib

        return "sha:" + hashlib.blake2b(self.image_bytes(row, k, value), digest_size=16).hexdigest()

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.source}: row {i} out of range (0..{len(self) - 1})")
        return i


# --------------------------------------------------------------------------------------------

def _split_files(files: list[Path], folder: Path, split: str) -> list[Path]:
    """Files of `split` when the folder holds several splits (`train-*.parquet`, `train/`)."""
    def split_of(f: Path) -> str | None:
        parts = [f.stem.split("-")[0].split(".")[0]] + list(f.relative_to(folder).parts[:-1])
        return next((s for s in parts if s in SPLIT_NAMES), None)

    tagged = {f: split_of(f) for f in files}
    if not any(tagged.values()):
        return files
    chosen = [f for f, s in tagged.items() if s == split]
    if not chosen:
        found = sorted({s for s in tagged.values() if s})
        raise PairSchemaError(f"{folder}: no files of split {split!r}; found splits: {', '.join(found)}")
    return chosen


def open_pairs(source: str | os.PathLike, *, split: str = "train", image_dir: str | os.PathLike | None = None,
               cache_dir: str | None = None, revision: str | None = None) -> PairTable:
    """Open preference pairs from a hub id, a save_to_disk folder, parquet/arrow files or folders,
    or a CSV/JSONL file (+ image folder). See the module docstring for the columns."""
    import datasets

    path = Path(source)
    extra_dirs = [Path(image_dir)] if image_dir is not None else []
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PairSchemaError(f"{path}: no split {split!r}; found splits: {', '.join(ds)}")
                ds = ds[split]
            return PairTable(_HFBackend(ds, str(path)), extra_dirs)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        parquet = [f for f in files if f.suffix == ".parquet"]
        arrow = [f for f in files if f.suffix == ".arrow" and not f.name.startswith("cache-")]
        tables = [f for f in files if f.suffix in (".csv", ".jsonl")]
        if parquet:
            chosen = _split_files(parquet, path, split)
            return PairTable(_ParquetBackend(chosen, str(path), cache_dir), extra_dirs)
        if arrow:
            return _open_arrow(_split_files(arrow, path, split), str(path), extra_dirs)
        if len(tables) == 1:
            return open_pairs(tables[0], split=split, image_dir=image_dir)
        raise PairSchemaError(f"{path}: no .parquet or .arrow files, no save_to_disk dataset, and "
                              f"{len(tables)} CSV/JSONL files (need exactly one)")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return PairTable(_ParquetBackend([path], str(path), cache_dir), extra_dirs)
        if suffix == ".arrow":
            return _open_arrow([path], str(path), extra_dirs)
        if suffix in (".csv", ".jsonl", ".json"):
            table = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
            dirs = extra_dirs or [path.parent, path.parent / "images"]
            return PairTable(_TableBackend(table, str(path)), dirs)
        raise PairSchemaError(f"{path}: unknown file type {suffix!r} (expected .parquet, .arrow, .csv or .jsonl)")
    from ..hub import offline_message, unreachable
    from ..models import looks_like_path

    text = str(source)
    if looks_like_path(text):  # a file name (x.csv), a/b/c, ./x, runs/x: a mistyped path, not a hub id
        raise MissingInputError(f"no such file or folder: {source}")
    # a hub dataset id (needs network the first time; datasets caches it)
    unreachable()  # offline: fail at once below, not after a minute of retries
    try:
        ds = datasets.load_dataset(text, split=split, cache_dir=cache_dir, revision=revision)
    except Exception as err:
        offline = offline_message(text, "a local file or folder")
        raise MissingInputError(offline or f"{source}: not a local file or folder, and loading it as a datasets "
                                f"hub id failed ({type(err).__name__}: {err})") from err
    return PairTable(_HFBackend(ds, text), extra_dirs)


def _open_arrow(files: list[Path], source: str, dirs) -> PairTable:
    import datasets

    parts = []
    for f in files:
        try:
            parts.append(datasets.Dataset.from_file(str(f)))
        except Exception as err:
            raise PairSchemaError(f"{f}: not a readable arrow file ({err})") from None
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return PairTable(_HFBackend(ds, source), dirs)
