"""Streaming the documents of a domain's input files, cut into chunks that workers read alone.

A domain's input is a list of files (callers sort them). `plan_chunks` cuts it into `Chunk` s
of about `chunk_bytes` each, from nothing but the files (their sizes, names and parquet footers) and
`chunk_bytes`, never the number of workers, so the plan and every chunk's `id` are the same on
every run. `read_chunk` streams one chunk's documents in order, line by line or batch by batch,
so memory stays bounded whatever the corpus size. Formats, by file name:

- ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``: one JSON object per line, the text in `text_key`;
  blank lines are skipped. A plain ``.jsonl`` larger than `chunk_bytes` is cut into byte ranges;
  a compressed file cannot be seeked, so it is always read whole by one chunk.
- ``*.parquet``: the `text_key` column (string or binary); a large file is cut at row-group
  boundaries.
- anything else (``.txt``, ``.txt.gz``, ``.txt.zst``, no suffix, ...): plain text, one document
  per file; ``.gz``/``.zst`` are decompressed transparently. Line ends are normalised to ``\\n``
  as Python's text mode does.

Small whole files of one format and compression are grouped into one chunk, so a corpus of many
small files does not become as many chunks. Only the standard library is imported at import
time; pyarrow (parquet) and zstandard (``.zst``) are imported when a file needs them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

from nemo_btx.errors import BtxError, ConfigError

Format = Literal["jsonl", "text", "parquet"]
Compression = Optional[Literal["gz", "zst"]]

#: Rows per parquet batch: a few hundred documents, a few MB, whatever the row-group size.
PARQUET_BATCH_ROWS = 256
#: Largest zstd window accepted (files written with ``zstd --long=31``).
_ZSTD_MAX_WINDOW = 1 << 31
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """A piece of a domain's input that one worker reads on its own.

    Either a group of whole files of one format and compression (``start=0, stop=None``), or a
    part of one file: a byte range ``[start, stop)`` of a plain ``.jsonl`` (it holds the lines
    whose first byte lies in the range) or the row groups ``[start, stop)`` of a parquet file.
    """

    index: int
    """Position in the plan; chunks are in file order and outputs are merged in this order."""
    files: Tuple[str, ...]
    fmt: Format
    compression: Compression = None
    start: int = 0
    stop: Optional[int] = None
    nbytes: int = 0
    """Input bytes covered: file bytes, or for parquet the row groups' uncompressed size."""

    @property
    def id(self) -> str:
        """Stable name across runs (same files, same `chunk_bytes`): ``000042``."""
        return f"{self.index:06d}"

    def describe(self) -> str:
        """One line for logs: which files, which part, how many bytes."""
        size = _human(self.nbytes)
        if len(self.files) > 1:
            return (f"chunk {self.id}: {len(self.files)} {self.fmt} files "
                    f"{self.files[0]} .. {self.files[-1]} ({size})")
        part = ""
        if self.fmt == "parquet" and self.stop is not None:
            part = f" row groups {self.start}-{self.stop - 1}"
        elif self.start or self.stop is not None:
            part = f" bytes {self.start}-{self.stop if self.stop is not None else 'end'}"
        return f"chunk {self.id}: {self.files[0]}{part} ({size})"

    def as_dict(self) -> dict:
        """JSON-ready fields (a cluster unit records its chunks); `from_dict` reverses it."""
        out = asdict(self)
        out["files"] = list(self.files)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Chunk":
        return cls(**{**d, "files": tuple(d["files"])})


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def file_format(path: Union[str, Path]) -> Tuple[Format, Compression]:
    """(format, compression) of a file from its name (case-insensitive)."""
    name = Path(path).name.lower()
    compression: Compression = None
    for suffix, kind in ((".gz", "gz"), (".zst", "zst")):
        if name.endswith(suffix):
            name, compression = name[:-len(suffix)], kind
    if name.endswith(".jsonl"):
        return "jsonl", compression
    if name.endswith(".parquet"):
        if compression:
            raise BtxError(f"{path}: a parquet file compresses its own pages; give the "
                           f".parquet file itself, not a .{compression} of it")
        return "parquet", None
    return "text", compression


# --------------------------------------------------------------------------- planning


def plan_chunks(files: Sequence[Union[str, Path]], chunk_bytes: int) -> List[Chunk]:
    """Cut `files` (in the order given) into chunks of about `chunk_bytes` input bytes.

    A plain ``.jsonl`` over `chunk_bytes` is cut into ``ceil(size / chunk_bytes)`` equal byte
    ranges; a parquet file over it into consecutive row groups whose total reaches `chunk_bytes`
    (from the footer's ``total_byte_size``). Other files are whole: consecutive ones of the same
    format and compression are grouped until the group reaches `chunk_bytes` (a compressed file
    is never split, whatever its size). Reads only file sizes and parquet footers.
    """
    if chunk_bytes < 1:
        raise BtxError(f"chunk_bytes={chunk_bytes}: must be >= 1")
    out: List[Chunk] = []
    group: List[str] = []
    group_kind: Optional[Tuple[Format, Compression]] = None
    group_bytes = 0

    def emit(paths, fmt, compression, start=0, stop=None, nbytes=0):
        out.append(Chunk(len(out), tuple(paths), fmt, compression, start, stop, nbytes))

    def flush():
        nonlocal group, group_kind, group_bytes
        if group:
            emit(group, *group_kind, nbytes=group_bytes)
        group, group_kind, group_bytes = [], None, 0

    for f in files:
        path = str(f)
        fmt, compression = file_format(path)
        if fmt == "parquet":
            sizes = _row_group_sizes(path)
            size = sum(sizes)
        else:
            sizes = None
            size = _stat(path).st_size
        if size > chunk_bytes and fmt == "parquet" and len(sizes) > 1:
            flush()
            start = acc = 0
            for i, s in enumerate(sizes):
                acc += s
                if acc >= chunk_bytes or i == len(sizes) - 1:
                    emit([path], "parquet", None, start, i + 1, acc)
                    start, acc = i + 1, 0
        elif size > chunk_bytes and fmt == "jsonl" and compression is None:
            flush()
            n = -(-size // chunk_bytes)
            bounds = [size * k // n for k in range(n + 1)]
            for a, b in zip(bounds, bounds[1:]):
                emit([path], "jsonl", None, a, b, b - a)
        else:
            if group_kind is not None and group_kind != (fmt, compression):
                flush()
            group.append(path)
            group_kind = (fmt, compression)
            group_bytes += size
            if group_bytes >= chunk_bytes:
                flush()
    flush()
    return out


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise BtxError(f"{path}: cannot read ({err.strerror or err})") from None


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BtxError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except OSError as err:
        raise BtxError(f"{path}: cannot read as parquet ({err})") from None
    except Exception as err:  # pyarrow.ArrowInvalid: not a parquet file, bad footer
        raise BtxError(f"{path} is not a valid parquet file ({err})") from None


def _row_group_sizes(path: str) -> List[int]:
    meta = _parquet_file(path).metadata
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def input_fingerprint(chunk: Chunk) -> dict:
    """What a chunk's output depends on: each file's resolved path, size and mtime, and the part
    of them the chunk covers. A cluster unit compares it to tell whether its inputs changed."""
    files = []
    for path in chunk.files:
        st = _stat(path)
        files.append({"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": files, "fmt": chunk.fmt, "compression": chunk.compression,
            "start": chunk.start, "stop": chunk.stop}


# --------------------------------------------------------------------------- bad records


@dataclass
class BadRecords:
    """Counts of records skipped with ``skip_bad=True``, by reason, and the first few messages.

    Reasons: ``invalid_json``, ``not_object``, ``missing_field``, ``not_string``, ``null``,
    ``invalid_utf8``. Merge the counters of several chunks in chunk order with `merge`.
    """

    max_locations: int = 5
    counts: Dict[str, int] = field(default_factory=dict)
    locations: List[str] = field(default_factory=list)
    """The first `max_locations` problems, each the one-line message an error would have had."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def wants_location(self) -> bool:
        return len(self.locations) < self.max_locations

    def add(self, reason: str, message: Optional[str] = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if message is not None and self.wants_location:
            self.locations.append(message)

    def merge(self, other: "BadRecords") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        self.locations.extend(other.locations[:max(0, self.max_locations - len(self.locations))])

    def summary(self) -> str:
        """``3 bad records skipped (invalid_json: 2, null: 1); first: <message>``, or ''."""
        if not self.total:
            return ""
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        first = f"; first: {self.locations[0]}" if self.locations else ""
        return f"{self.total} bad record{'s' if self.total != 1 else ''} skipped ({reasons}){first}"


class _Problems:
    """Raises a record's problem as one line, or counts it when bad records are skipped."""

    def __init__(self, skip_bad: bool, bad: Optional[BadRecords], where_key: Optional[str], text_key: str):
        self.skip = skip_bad
        self.bad = bad if bad is not None else BadRecords(max_locations=0)
        self.where_key, self.text_key = where_key, text_key

    def record(self, reason: str, message: Callable[[], str], field_error: bool = False) -> None:
        """`message` is called only when needed: a line number may cost a scan of the file."""
        if self.skip:
            self.bad.add(reason, message() if self.bad.wants_location else None)
            return
        raise self.error(message(), field_error)

    def error(self, message: str, field_error: bool = False) -> BtxError:
        if field_error and self.where_key:
            return ConfigError(f"{self.where_key}.text_key", self.text_key, message)
        return BtxError(f"{self.where_key}.source: {message}" if self.where_key else message)


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _unicode_problem(text: str) -> Optional[str]:
    """Why `text` cannot be written as UTF-8 (a lone surrogate from a \\ud800 escape), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"a lone surrogate {text[err.start]!r} at character {err.start}"
    return None


# --------------------------------------------------------------------------- reading


def read_chunk(chunk: Chunk, *, text_key: str = "text", skip_bad: bool = False,
               bad: Optional[BadRecords] = None, where_key: Optional[str] = None) -> Iterator[str]:
    """The chunk's documents in order, streamed with bounded memory (empty ones included).

    A malformed record (invalid JSON, not an object, no `text_key`, text not a string, a null,
    invalid UTF-8) raises one line naming the file and its line (jsonl: the line number in the
    whole file) or row (parquet: the row in the whole file). `where_key` is the domain's config
    key (``data.domains.3``): errors then start with ``data.domains.3.source:``, and a missing or
    mistyped field raises `ConfigError` on ``data.domains.3.text_key``. With `skip_bad`, bad
    records are skipped and counted into `bad` instead. Unreadable, truncated or corrupt files
    always raise.
    """
    problems = _Problems(skip_bad, bad, where_key, text_key)
    broken = _read_errors(chunk)
    for path in chunk.files:
        try:
            if chunk.fmt == "jsonl":
                yield from _jsonl(path, chunk, problems)
            elif chunk.fmt == "parquet":
                yield from _parquet(path, chunk, problems)
            else:
                doc = _text(path, chunk.compression, problems)
                if doc is not None:
                    yield doc
        except BtxError:
            raise
        except broken as err:
            raise problems.error(f"{path}: cannot read it ({_reason(err)})") from None


def _read_errors(chunk: Chunk) -> tuple:
    """What a missing, truncated or corrupt file raises while `chunk` is read."""
    errors = (OSError, EOFError, zlib.error)
    if chunk.compression == "zst":
        try:
            import zstandard
            errors += (zstandard.ZstdError,)
        except ImportError:
            pass
    if chunk.fmt == "parquet":
        try:
            import pyarrow
            errors += (pyarrow.ArrowException,)
        except ImportError:
            pass
    return errors


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _open_binary(path: str, compression: Compression) -> io.BufferedIOBase:
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise BtxError(f"{path}: reading .zst files needs the zstandard package: "
                           "pip install zstandard") from None
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
            raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=_READ_BLOCK)
    return open(path, "rb", buffering=_READ_BLOCK)


def _text(path: str, compression: Compression, problems: _Problems) -> Optional[str]:
    """One whole file as one document, line ends normalised as Python's text mode does."""
    with _open_binary(path, compression) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        problems.record("invalid_utf8",
                        lambda err=err: f"{path} is not UTF-8 text ({err.reason} at byte {err.start})")
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _count_newlines(path: str, end: int) -> int:
    """Newlines in the file's first `end` bytes (only computed to name a bad line)."""
    count = 0
    with open(path, "rb") as f:
        while end > 0:
            block = f.read(min(_READ_BLOCK * 8, end))
            if not block:
                break
            count += block.count(b"\n")
            end -= len(block)
    return count


class _LineNames:
    """``path:N`` for the line `rel` lines after byte `first` (a line start), whose number in the
    whole file is known only by counting the newlines before `first`: done once, when needed."""

    def __init__(self, path: str, first: int):
        self.path, self.first, self.base = path, first, None if first else 0

    def __call__(self, rel: int) -> str:
        if self.base is None:
            self.base = _count_newlines(self.path, self.first)
        return f"{self.path}:{self.base + rel + 1}"


def _jsonl(path: str, chunk: Chunk, problems: _Problems) -> Iterator[str]:
    key = problems.text_key
    ranged = chunk.compression is None and (chunk.start > 0 or chunk.stop is not None)
    with _open_binary(path, chunk.compression) as f:
        pos = 0
        if ranged and chunk.start > 0:
            # The range holds the lines that start in [start, stop): skip the line that holds
            # byte start-1 (a newline there means `start` begins a line, and nothing is skipped).
            f.seek(chunk.start - 1)
            pos = chunk.start - 1 + len(f.readline())
        stop = chunk.stop if ranged else None
        names = _LineNames(path, pos)
        for rel, line in enumerate(f):
            if stop is not None and pos >= stop:
                break
            pos += len(line)
            if pos == len(line) and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark before the file's first record
            try:
                text_line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.record("invalid_utf8", lambda err=err: f"{names(rel)} is not UTF-8 text "
                                f"({err.reason} at byte {err.start} of the line)")
                continue
            if not text_line.strip():
                continue
            try:
                row = json.loads(text_line)
            except json.JSONDecodeError as err:
                problems.record("invalid_json", lambda err=err: f"{names(rel)} is not valid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                problems.record("not_object", lambda: f"{names(rel)} is a JSON {_json_kind(row)}, "
                                f"not an object with field '{key}'", field_error=True)
                continue
            if key not in row:
                problems.record("missing_field", lambda: f"{names(rel)} has no field '{key}' "
                                f"(it has: {_names(row)})", field_error=True)
                continue
            text = row[key]
            if not isinstance(text, str):
                reason = "null" if text is None else "not_string"
                problems.record(reason, lambda: f"{names(rel)}: field '{key}' is {_json_kind(text)}, "
                                "not a string", field_error=True)
                continue
            bad = _unicode_problem(text)
            if bad:
                problems.record("invalid_utf8", lambda: f"{names(rel)}: field '{key}' is not valid "
                                f"Unicode text ({bad})")
                continue
            yield text


def _names(row: dict, limit: int = 10) -> str:
    names = list(row)
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "no fields"


def _parquet(path: str, chunk: Chunk, problems: _Problems) -> Iterator[str]:
    import pyarrow as pa

    key = problems.text_key
    pf = _parquet_file(path)
    meta = pf.metadata
    schema = pf.schema_arrow
    if key not in schema.names:
        raise problems.error(f"{path} has no column '{key}' (it has: {', '.join(schema.names)})",
                             field_error=True)
    kind = schema.field(key).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
        getattr(pa.types, "is_string_view", lambda t: False)(kind)
    is_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or \
        getattr(pa.types, "is_binary_view", lambda t: False)(kind)
    if not (is_text or is_bytes):
        raise problems.error(f"{path}: column '{key}' holds {kind}, not strings", field_error=True)
    stop = meta.num_row_groups if chunk.stop is None else chunk.stop
    groups = list(range(chunk.start, stop))
    if not groups:
        return
    row = sum(meta.row_group(i).num_rows for i in range(chunk.start))
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[key],
                                 use_threads=False):
        column = batch.column(0)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        values = None
        if is_text:
            try:
                values = column.to_pylist()
            except UnicodeDecodeError:  # arrow does not check UTF-8 when it reads: find the row
                column = column.cast(pa.binary()) if not pa.types.is_large_string(column.type) \
                    else column.cast(pa.large_binary())
        if values is None:
            values = column.to_pylist()
        for i, value in enumerate(values):
            n = row + i
            if value is None:
                problems.record("null", lambda: f"{path} row {n}: column '{key}' is null, not a string",
                                field_error=True)
                continue
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as err:
                    problems.record("invalid_utf8", lambda err=err: f"{path} row {n} is not UTF-8 text "
                                    f"({err.reason} at byte {err.start} of the value)")
                    continue
            yield value
        row += len(values)
