"""The raw text of a corpus: which files, what documents they hold, which split each is in.

A document is one text file, one JSONL line's text field, or one table row's text column.
Documents stream as pieces of bounded size, so a corpus larger than memory can be read.
"""

import glob
import gzip
import hashlib
import json
import os
import site
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# The "python" corpus adds the installed packages' sources and docs (licences and other
# .txt files left out: the same few texts repeated in hundreds of packages).
PACKAGE_SUFFIXES = (".py", ".pyi", ".md", ".rst")
PIECE_BYTES = 1 << 20  # a text file is read in pieces of about this many bytes
TABLE_ROWS = 1024  # rows per batch read from a Parquet or Arrow table


class DataError(Exception):
    """Input that cannot be used; the message names the path or field."""


@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # as the manifest shows it (relative to the standard library for the default)
    # A user's file that is not UTF-8 is an error; the standard library holds a few legacy
    # encoded files on purpose (tests of PEP 263), read with replacement characters.
    errors: str = "strict"

    @property
    def kind(self) -> str:
        suffix = Path(self.path.name.removesuffix(".gz")).suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        if suffix in (".parquet", ".arrow", ".feather", ".ipc"):
            return "table"
        return "text"

    def open(self) -> BinaryIO:
        """The file's bytes, through gzip if its name ends in .gz."""
        return gzip.open(self.path) if self.path.name.endswith(".gz") else open(self.path, "rb")

    def decode(self, data: bytes, offset: int, line: int) -> str:
        """``data``, read from byte ``offset`` (on line ``line``) of the file, as text."""
        try:
            return data.decode("utf-8", errors=self.errors)
        except UnicodeDecodeError as err:
            line += data.count(b"\n", 0, err.start)
            where = f"byte {offset + err.start}: {err.reason}"
            raise DataError(f"{self.path}:{line}: not UTF-8 text ({where})") from None

    def stamp(self) -> list:
        """Cheap identity for cache keys: a changed file gets new shards."""
        stat = self.path.stat()
        return [str(self.path.resolve()), stat.st_size, stat.st_mtime_ns]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()


@dataclass(frozen=True)
class Piece:
    """Part of a document: ``key`` is the document's content hash, ``last`` ends it."""

    key: bytes
    text: str
    last: bool


def resolve_sources(paths: list[str], corpus: str = "stdlib") -> list[Source]:
    """Files named by paths or globs, in a stable order; none: the built-in ``corpus``."""
    if not paths:
        return builtin_sources(corpus)
    sources = []
    for pattern in paths:
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise DataError(f"{pattern}: no such file (or the glob matches no file)")
        sources.extend(Source(p, str(p)) for p in matched)
    return sources


def builtin_sources(corpus: str) -> list[Source]:
    """The corpora on every machine that runs this project, nothing to download.

    "stdlib": the Python standard library's sources, about 30 MB of real code and English
    docstrings. "python": those and the installed packages' sources and docs (hundreds of MB
    beside torch), for studies whose trials would go over the standard library many times.
    The files differ between machines; the manifest records each one's SHA-256.
    """
    files = [
        (p, p.relative_to(STDLIB).as_posix())
        for p in sorted(STDLIB.rglob("*.py"))
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]
    if corpus == "python":
        for root in package_roots():
            found = (p for p in root.rglob("*") if p.suffix in PACKAGE_SUFFIXES and p.is_file())
            files += [(p, f"packages/{p.relative_to(root).as_posix()}") for p in sorted(found)]
    return [Source(path, name, "replace") for path, name in files]


def package_roots() -> list[Path]:
    """The running interpreter's package folders, each once."""
    paths = sysconfig.get_paths()
    found = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    roots = []
    for p in map(Path, found):
        if p.is_dir() and p.resolve() not in [r.resolve() for r in roots]:
            roots.append(p)
    return roots


def stable_hash(value: object) -> str:
    """A short hash of JSON-able ``value``, the same on every machine: a cache key."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def in_validation(key: bytes, val_fraction: float) -> bool:
    """A document's split from its content alone: stable anywhere, and duplicates agree."""
    return int.from_bytes(key[:8], "big") / 2**64 < val_fraction


def pieces(source: Source, text_field: str, sha256: str) -> Iterator[Piece]:
    """The documents of one source, as pieces; ``sha256`` is the file's (a text file's key)."""
    if source.kind == "text":
        yield from _text_pieces(source, bytes.fromhex(sha256))
    else:
        texts = (
            _jsonl_texts(source, text_field)
            if source.kind == "jsonl"
            else _table_texts(source, text_field)
        )
        for text in texts:
            yield Piece(hashlib.blake2b(text.encode(), digest_size=8).digest(), text, True)


def _text_pieces(source: Source, key: bytes) -> Iterator[Piece]:
    # Bytes cut at line ends: each piece decodes alone, and a bad byte has its line.
    with source.open() as f:
        offset, line = 0, 1
        piece = b"".join(f.readlines(PIECE_BYTES))
        while piece:
            following = b"".join(f.readlines(PIECE_BYTES))
            yield Piece(key, source.decode(piece, offset, line), not following)
            offset, line = offset + len(piece), line + piece.count(b"\n")
            piece = following


def _jsonl_texts(source: Source, field: str) -> Iterator[str]:
    with source.open() as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            line = source.decode(raw, offset, number)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source.path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{source.path}:{number}: no '{field}' field")
            if record[field] is not None:
                yield str(record[field])


def _table_texts(source: Source, field: str) -> Iterator[str]:
    if source.path.suffix.lower() == ".parquet":
        table = pq.ParquetFile(source.path)
        _require_column(source, field, table.schema_arrow.names)
        batches = table.iter_batches(batch_size=TABLE_ROWS, columns=[field])
    else:
        batches = _arrow_reader(source.path)
        _require_column(source, field, batches.schema.names)
    for batch in batches:
        for start in range(0, batch.num_rows, TABLE_ROWS):
            for text in batch.slice(start, TABLE_ROWS).column(field).to_pylist():
                if text is not None:
                    yield text


def _require_column(source: Source, field: str, columns: list[str]) -> None:
    if field not in columns:
        raise DataError(f"{source.path}: no column '{field}' (it has {', '.join(columns)})")


def _arrow_reader(path: Path) -> pa.RecordBatchReader:
    """Arrow IPC batches, from the file format or the stream format (Hugging Face's caches)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return pa.RecordBatchReader.from_batches(
            reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        )
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
