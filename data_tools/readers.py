"""Reading documents from JSONL (plain, .gz, .zst) and Parquet files, globs or directories.

Records are handed out raw (the undecoded bytes of a JSONL line, or a Parquet row as a dict)
together with their 1-based line/row number, so parsing can happen in worker processes and
every bad record can be reported as `file:line`.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from data_tools.errors import DataToolsError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
SKIP_KINDS = ("invalid_json", "missing_field", "empty", "invalid_utf8")

RawRecord = Union[bytes, dict]


def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES)


def _is_supported(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)


def resolve_inputs(specs: Sequence[str]) -> List[str]:
    """Expand files, globs and directories (recursively, supported suffixes only), in order."""
    files: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if _is_supported(name)
            )
            if not found:
                raise DataToolsError(f"{spec}: directory contains no .jsonl[.gz|.zst] or .parquet files")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataToolsError(f"{spec}: glob matched no files")
            files.extend(found)
        else:
            raise DataToolsError(f"{spec}: no such file or directory")
    seen, unique = set(), []
    for path in files:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"), buffer_size=1 << 20)
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def count_records(path: str) -> int:
    """Lines of a JSONL file (a last line without newline counts) or rows of a Parquet file."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    count, last = 0, b"\n"
    try:
        with _open_binary(path) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, EOFError) as exc:
        raise DataToolsError(f"{path}: cannot read ({exc})") from exc
    return count + (last != b"\n")


def iter_records(
    path: str, start: int = 0, stop: Optional[int] = None, columns: Optional[List[str]] = None
) -> Iterator[Tuple[int, RawRecord]]:
    """Yield (line_number, raw) for records with 0-based index in [start, stop).

    Blank JSONL lines are passed over (they still take a line number).
    """
    if is_parquet(path):
        yield from _iter_parquet(path, start, stop, columns)
        return
    try:
        with _open_binary(path) as f:
            for index, line in enumerate(f):
                if index < start:
                    continue
                if stop is not None and index >= stop:
                    break
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield index + 1, line
    except (OSError, EOFError) as exc:
        raise DataToolsError(f"{path}: cannot read ({exc})") from exc


def _iter_parquet(path, start, stop, columns) -> Iterator[Tuple[int, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataToolsError(
                f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})"
            )
    index = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        rows = batch.num_rows
        if index + rows <= start:
            index += rows
            continue
        for row in batch.to_pylist():
            if index >= start and (stop is None or index < stop):
                yield index + 1, row
            index += 1
        if stop is not None and index >= stop:
            return


try:
    import orjson
except ImportError:  # optional: json below gives the same objects, slower
    orjson = None


def _fast_loads(raw: bytes):
    """orjson's parse of a JSONL line, or None for whatever it rejects (invalid UTF-8 or JSON,
    but also NaN, lone surrogates, huge integers): those go through `json`, which decides and
    words the error exactly as without orjson."""
    if orjson is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


@dataclass
class BadRecord:
    kind: str  # one of SKIP_KINDS
    detail: str


def _load_object(raw: RawRecord, fast_json: bool) -> Union[dict, BadRecord]:
    """A raw JSONL line as its JSON object (a Parquet record already is one)."""
    if not isinstance(raw, (bytes, bytearray)):
        return raw
    obj = _fast_loads(raw) if fast_json else None
    if isinstance(obj, dict):
        return obj
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return BadRecord("invalid_json", f"invalid JSON ({exc})")
    if not isinstance(obj, dict):
        return BadRecord("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_record(raw: RawRecord, text_field: str, fast_json: bool = False) -> Union[Tuple[dict, str], BadRecord]:
    """Decode one raw record into (object, text) or say why it is unusable.

    fast_json: parse with orjson when installed. The verdict and the text are the same as with
    `json`; the object can differ in integers beyond 64 bits (orjson reads them as floats), so
    only callers that use the text alone (preprocess) ask for it."""
    obj = _load_object(raw, fast_json)
    if isinstance(obj, BadRecord):
        return obj
    if text_field not in obj or obj[text_field] is None:
        return BadRecord("missing_field", f"no {text_field!r} field")
    text = obj[text_field]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadRecord("invalid_utf8", f"field {text_field!r}: invalid UTF-8 at byte {exc.start}")
    if not isinstance(text, str):
        return BadRecord("missing_field", f"field {text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        return BadRecord("empty", f"field {text_field!r} is empty")
    return obj, text


def record_batches(files: Sequence[str], batch_docs: int = 1024):
    """((file index, line) per record, raw records) batches over ``files``, as
    ``data_tools.parallel.ordered_map`` takes them: (meta, payload) with payload = the records."""
    meta, raws = [], []
    for file_index, path in enumerate(files):
        for line_no, raw in iter_records(path):
            meta.append((file_index, line_no))
            raws.append(raw)
            if len(raws) >= batch_docs:
                yield (meta, raws), raws
                meta, raws = [], []
    if raws:
        yield (meta, raws), raws


def record_line(raw: RawRecord) -> bytes:
    """A record as one JSONL line (a JSONL record's original bytes, unchanged)."""
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    return json.dumps(raw, ensure_ascii=False, default=str).encode("utf-8")
