"""Input readers: every format yields the same documents, chunks partition the input exactly,
bad records fail in one line naming file and line (or are counted), memory stays bounded."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from nemo_btx.data import readers
from nemo_btx.data.readers import BadRecords, Chunk, plan_chunks, read_chunk
from nemo_btx.errors import BtxError, ConfigError

from conftest import REPO

try:
    import zstandard
except ImportError:  # the Makefile installs it (pyproject dependency); a bare venv may lack it
    zstandard = None

needs_zstd = pytest.mark.skipif(zstandard is None, reason="zstandard is not installed: .zst inputs "
                                "cannot be read (pip install zstandard)")

DOCS = ["Hello, world.", "", "two\nlines\n", 'a literal backslash-n: \\n and a "quote"',
        "unicode: héllo wörld — 日本語 — emoji 🎉", "tabs\tand trailing spaces   ", "",
        "\n", "x" * 300] + [f"document {i}: " + "word " * (i * 7 % 23) for i in range(30)]


def _jsonl_bytes(docs, key="text"):
    return "".join(json.dumps({key: d, "id": i}, ensure_ascii=i % 2 == 0) + "\n"
                   for i, d in enumerate(docs)).encode()


def _write(tmp_path, fmt, docs=DOCS):
    """The documents written in format `fmt`; returns the files in reading order."""
    root = tmp_path / fmt
    root.mkdir()
    if fmt.startswith("jsonl"):
        path = root / f"docs.{fmt}"
        data = _jsonl_bytes(docs)
        if fmt.endswith(".gz"):
            data = gzip.compress(data)
        elif fmt.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
        return [path]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=4)
        assert pq.ParquetFile(path).metadata.num_row_groups > 5
        return [path]
    files = []
    for i, d in enumerate(docs):
        path = root / f"doc{i:03d}.{fmt}"
        data = d.encode()
        if fmt.endswith(".gz"):
            data = gzip.compress(data)
        elif fmt.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
        files.append(path)
    return files


def _read_all(chunks, **kw):
    return [doc for chunk in chunks for doc in read_chunk(chunk, **kw)]


FORMATS = ["jsonl", "jsonl.gz", pytest.param("jsonl.zst", marks=needs_zstd), "parquet", "txt",
           "txt.gz", pytest.param("txt.zst", marks=needs_zstd)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_yields_the_same_documents_for_any_chunk_size(tmp_path, fmt):
    files = _write(tmp_path, fmt)
    for chunk_bytes in (1, 7, 64, 500, 1 << 40):
        chunks = plan_chunks(files, chunk_bytes)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert _read_all(chunks) == DOCS, (fmt, chunk_bytes)
    assert len(plan_chunks(files, 1 << 40)) == 1


def test_plain_jsonl_is_cut_into_byte_ranges_and_compressed_is_not(tmp_path):
    plain, gz = _write(tmp_path, "jsonl")[0], _write(tmp_path, "jsonl.gz")[0]
    size = plain.stat().st_size
    chunks = plan_chunks([plain], 100)
    assert len(chunks) == -(-size // 100)
    assert chunks[0].start == 0 and chunks[-1].stop == size
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert sum(c.nbytes for c in chunks) == size
    assert [(c.files, c.start, c.stop) for c in plan_chunks([gz], 1)] == [((str(gz),), 0, None)]


def test_parquet_is_cut_at_row_group_boundaries(tmp_path):
    import pyarrow.parquet as pq

    path = _write(tmp_path, "parquet")[0]
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    target = 2 * max(sizes)
    chunks = plan_chunks([path], target)
    assert 1 < len(chunks) < len(sizes)
    assert chunks[0].start == 0 and chunks[-1].stop == len(sizes)
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    for c in chunks[:-1]:  # a chunk closes as soon as it reaches the target
        assert sum(sizes[c.start:c.stop]) >= target > sum(sizes[c.start:c.stop - 1])
    assert [c.nbytes for c in chunks] == [sum(sizes[c.start:c.stop]) for c in chunks]


def test_small_whole_files_are_grouped_by_format_and_compression(tmp_path):
    files = []
    for name, size in [("a.txt", 40), ("b.txt", 40), ("c.txt", 40), ("d.txt.gz", 0), ("e.txt", 10),
                       ("f.jsonl", 10), ("g.jsonl", 10), ("h.txt", 200), ("i.txt", 5)]:
        path = tmp_path / name
        data = b"y" * size
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        files.append(path)
    chunks = plan_chunks(files, 100)
    assert [[Path(f).name for f in c.files] for c in chunks] == [
        ["a.txt", "b.txt", "c.txt"], ["d.txt.gz"], ["e.txt"], ["f.jsonl", "g.jsonl"], ["h.txt"], ["i.txt"]]
    assert [(c.fmt, c.compression) for c in chunks] == [
        ("text", None), ("text", "gz"), ("text", None), ("jsonl", None), ("text", None), ("text", None)]
    assert chunks[0].nbytes == 120


def test_plan_depends_only_on_files_and_chunk_bytes(tmp_path, monkeypatch):
    files = _write(tmp_path, "jsonl") + _write(tmp_path, "parquet") + _write(tmp_path, "txt")
    first = plan_chunks(files, 50)
    os.utime(files[0], ns=(1, 1))  # times and the working directory play no part
    monkeypatch.chdir(tmp_path / "txt")
    assert plan_chunks(files, 50) == first
    assert [c.id for c in first][:3] == ["000000", "000001", "000002"]
    assert plan_chunks([str(f) for f in files], 50) == first  # str or Path alike
    # a chunk travels as JSON (a cluster unit's plan) and comes back equal
    assert [Chunk.from_dict(json.loads(json.dumps(c.as_dict()))) for c in first] == first
    assert all(c.describe().startswith(f"chunk {c.id}: ") for c in first)


def _lines_of_range(path, start, stop):
    """The raw lines (as the 'n' ids) a byte range yields."""
    chunk = Chunk(0, (str(path),), "jsonl", None, start, stop, stop - start)
    return [int(d) for d in read_chunk(chunk)]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_partition_the_lines_exactly(tmp_path, trailing_newline):
    import random

    rng = random.Random(0)
    lines = [json.dumps({"text": str(i), "pad": "p" * rng.randrange(0, 30)}) for i in range(60)]
    lines[10] = ""  # a blank line is skipped, not lost in the count
    data = "\n".join(lines) + ("\n" if trailing_newline else "")
    path = tmp_path / "lines.jsonl"
    path.write_text(data)
    expected = [i for i, line in enumerate(lines) if line]
    size = len(data)
    for chunk_bytes in list(range(1, 41)) + [size - 1, size, size + 1]:
        got = _read_all(plan_chunks([path], chunk_bytes))
        assert [int(d) for d in got] == expected, chunk_bytes
    # a range that starts exactly at a line start holds that line; one starting a byte later does not
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    s = starts[5]
    assert _lines_of_range(path, s, starts[7]) == [5, 6]
    assert _lines_of_range(path, s + 1, starts[7]) == [6]
    assert _lines_of_range(path, s - 1, s) == []  # only line 4's newline lies there
    assert _lines_of_range(path, starts[4], starts[4] + 1) == [4]
    assert _lines_of_range(path, s, s) == []
    assert _lines_of_range(path, starts[-1], size) == [59]


def test_text_line_ends_are_normalised_like_python_text_mode(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n")
    assert _read_all(plan_chunks([path], 1 << 20)) == ["one\ntwo\nthree\n"]


def test_a_byte_order_mark_before_the_first_jsonl_record_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(DOCS[:3]))
    assert _read_all(plan_chunks([path], 1)) == _read_all(plan_chunks([path], 1 << 20)) == DOCS[:3]


# --------------------------------------------------------------------------- bad records

GOOD = json.dumps({"text": "fine"}).encode()
#: (raw line, reason, what the message says, raised as ConfigError on text_key with where_key)
BAD = [
    (b'{"text": "x",}', "invalid_json", "is not valid JSON (Expecting property name", False),
    (b'["text"]', "not_object", "is a JSON array, not an object with field 'text'", True),
    (b'{"body": "x", "id": 3}', "missing_field", "has no field 'text' (it has: body, id)", True),
    (b'{"text": 12}', "not_string", "field 'text' is number, not a string", True),
    (b'{"text": null}', "null", "field 'text' is null, not a string", True),
    (b'{"text": "caf\xe9"}', "invalid_utf8", "is not UTF-8 text (invalid continuation byte", False),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8", "lone surrogate", False),
]


def _file_with_bad_line(tmp_path, bad_line, bad_at=500, n=800):
    lines = [GOOD] * n
    lines[bad_at] = bad_line
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("line,reason,says,field_error", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_record_raises_one_line_naming_file_and_absolute_line(tmp_path, line, reason, says, field_error):
    path = _file_with_bad_line(tmp_path, line)
    chunks = plan_chunks([path], 1000)  # the bad line (501st) lies in a range that starts past 0
    assert len(chunks) > 5
    with pytest.raises(BtxError) as info:
        _read_all(chunks)
    msg = str(info.value)
    assert "\n" not in msg and f"{path}:501" in msg and says in msg, msg
    with pytest.raises(BtxError) as info:
        _read_all(chunks, where_key="data.domains.2")
    if field_error:
        assert isinstance(info.value, ConfigError) and info.value.key == "data.domains.2.text_key"
        assert str(info.value).startswith("data.domains.2.text_key='text': ")
    else:
        assert str(info.value).startswith(f"data.domains.2.source: {path}:501")
    # skipped instead: every other document is read and the bad one is counted with its place
    bad = BadRecords()
    assert _read_all(chunks, skip_bad=True, bad=bad) == ["fine"] * 799
    assert bad.counts == {reason: 1} and bad.total == 1
    assert len(bad.locations) == 1 and f"{path}:501" in bad.locations[0]
    assert bad.summary().startswith(f"1 bad record skipped ({reason}: 1); first: {path}:501")


def test_skip_bad_counts_every_reason_and_keeps_the_first_locations(tmp_path):
    lines = [GOOD] * 30
    for i, (line, *_rest) in enumerate(BAD * 2):
        lines[2 + 2 * i] = line
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    total = BadRecords(max_locations=3)
    for chunk in plan_chunks([path], 1):
        part = BadRecords(max_locations=3)
        docs = list(read_chunk(chunk, skip_bad=True, bad=part))
        total.merge(part)
    assert docs == ["fine"] * (30 - 14)
    reasons = [b[1] for b in BAD]
    assert total.counts == {r: 2 * reasons.count(r) for r in set(reasons)}
    assert [loc.split(" ")[0] for loc in total.locations] == [f"{path}:3", f"{path}:5", f"{path}:7"]
    # skipping without a counter is allowed (nothing recorded)
    assert _read_all(plan_chunks([path], 1), skip_bad=True) == docs


def test_parquet_nulls_name_the_absolute_row_and_bad_columns_fail_whole(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    docs = [f"d{i}" for i in range(40)]
    docs[33] = None
    pq.write_table(pa.table({"text": docs, "n": list(range(40))}), path, row_group_size=5)
    chunks = plan_chunks([path], 1)
    assert len(chunks) == 8
    with pytest.raises(ConfigError) as info:
        _read_all(chunks, where_key="data.domains.0")
    assert f"{path} row 33: column 'text' is null" in str(info.value)
    bad = BadRecords()
    assert _read_all(chunks, skip_bad=True, bad=bad) == [d for d in docs if d is not None]
    assert bad.counts == {"null": 1}
    with pytest.raises(ConfigError, match=r"has no column 'body' \(it has: text, n\)"):
        _read_all(chunks, text_key="body", skip_bad=True, where_key="data.domains.0")
    with pytest.raises(BtxError, match="column 'n' holds int64, not strings"):
        _read_all(chunks, text_key="n")


def test_parquet_invalid_utf8_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"good", b"bad \xff", b"also good"], pa.binary())
    as_string = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # unchecked, as files can be
    for name, column in (("bin.parquet", raw), ("str.parquet", as_string)):
        path = tmp_path / name
        pq.write_table(pa.table({"text": column}), path)
        with pytest.raises(BtxError, match=rf"{path} row 1 is not UTF-8 text \(invalid start byte"):
            _read_all(plan_chunks([path], 1))
        bad = BadRecords()
        assert _read_all(plan_chunks([path], 1), skip_bad=True, bad=bad) == ["good", "also good"]
        assert bad.counts == {"invalid_utf8": 1}


def test_bad_text_file_and_corrupt_compressed_files_fail_in_one_line(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(BtxError, match=rf"^{text} is not UTF-8 text \(invalid continuation byte at byte 3\)$"):
        _read_all(plan_chunks([text], 1))
    bad = BadRecords()
    assert _read_all(plan_chunks([text], 1), skip_bad=True, bad=bad) == [] and bad.total == 1

    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"not gzip at all\n")
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(b"some text " * 100)[:-20])
    for path in (fake, truncated):
        with pytest.raises(BtxError) as info:  # even with skip_bad: a corrupt file is not a record
            _read_all(plan_chunks([path], 1), skip_bad=True)
        msg = str(info.value)
        assert msg.startswith(f"{path}: cannot read it (") and "\n" not in msg, msg
    with pytest.raises(BtxError, match="parquet file compresses its own pages"):
        plan_chunks([tmp_path / "x.parquet.gz"], 1)
    with pytest.raises(BtxError, match=r"missing.jsonl: cannot read"):
        plan_chunks([tmp_path / "missing.jsonl"], 1)


@needs_zstd
def test_corrupt_zst_fails_in_one_line(tmp_path):
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(BtxError, match=rf"^{path}: cannot read it \("):
        _read_all(plan_chunks([path], 1))


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "a.txt.zst"
    path.write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(BtxError, match=r"needs the zstandard package: pip install zstandard"):
        _read_all(plan_chunks([path], 1))


def test_input_fingerprint_changes_with_the_files(tmp_path):
    files = _write(tmp_path, "txt")[:3]
    chunk = plan_chunks(files, 1 << 20)[0]
    first = readers.input_fingerprint(chunk)
    assert [f["path"] for f in first["files"]] == [str(p.resolve()) for p in files]
    assert readers.input_fingerprint(chunk) == first
    files[1].write_text("changed, longer text")
    assert readers.input_fingerprint(chunk) != first
    assert readers.input_fingerprint(replace(chunk, stop=5)) != readers.input_fingerprint(chunk)


# --------------------------------------------------------------------------- resources


def _run(code, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_readers_import_neither_torch_nor_megatron_nor_pyarrow():
    loaded = _run("""
        import json, sys
        import nemo_btx.data.readers
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in
                                ('torch', 'megatron', 'pyarrow', 'zstandard'))))
    """)
    assert loaded == []


def test_reading_a_large_jsonl_keeps_memory_bounded(tmp_path):
    path = tmp_path / "big.jsonl"
    body = "lorem ipsum dolor sit amet " * 80  # ~2 KB a document, 25,000 documents: ~54 MB
    with open(path, "w") as f:
        for i in range(25_000):
            f.write(json.dumps({"text": f"{i} {body}", "id": i}) + "\n")
    assert path.stat().st_size > 50_000_000
    stats = _run("""
        import json, resource, sys
        from nemo_btx.data import readers

        def peak_kb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        path = sys.argv[1]
        out = {}
        for name, chunk_bytes in (("ranges", 4 << 20), ("whole", 1 << 40)):
            chunks = readers.plan_chunks([path], chunk_bytes)
            before = peak_kb()
            n = chars = 0
            for chunk in chunks:
                for doc in readers.read_chunk(chunk):
                    n += 1
                    chars += len(doc)
            out[name] = {"chunks": len(chunks), "docs": n, "chars": chars, "growth_kb": peak_kb() - before}
        print(json.dumps(out))
    """, path)
    assert stats["ranges"]["chunks"] > 10 and stats["whole"]["chunks"] == 1
    for run in stats.values():
        assert run["docs"] == 25_000 and run["chars"] > 50_000_000
        assert run["growth_kb"] < 30 * 1024, stats
