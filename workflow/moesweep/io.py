"""Atomic file output, content hashes and safe artefact reading.

Every artefact is written to a temporary name in the destination folder and renamed into place, so a
reader (or a resumed Snakemake run) never sees a half-written file. Nothing here unpickles anything.

Content hashes. Every safetensors, Parquet and JSON artefact carries an xxh3-128 digest of its own bytes:
a metadata entry `moesweep_xxh3_128` (safetensors header metadata, Parquet key-value metadata, a top-level
JSON key) whose value is 32 hex digits. The digest covers the whole file with that value read as 32 ASCII
zeros, so it is written by patching the placeholder in place after the file is complete (the file's layout
does not move) and checked by hashing the file the same way. Any flipped byte anywhere, header included,
changes the digest; metadata and shape checks alone miss a flipped payload byte.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterator


class ArtefactError(RuntimeError):
    """A cached artefact is missing, corrupt or belongs to something else; the message says how to rebuild."""


HASH_KEY = "moesweep_xxh3_128"
_PLACEHOLDER = b"0" * 32
# Key, then at most 4 bytes of framing (JSON `": "`, safetensors `":"`, Parquet's thrift field header and
# length byte), then the 32 hex digits.
_DIGEST_RE = re.compile(re.escape(HASH_KEY.encode()) + rb"(.{1,4}?)([0-9a-f]{32})", re.DOTALL)
_KINDS = {".safetensors": "safetensors", ".parquet": "parquet", ".json": "json"}
_umask_lock = threading.Lock()


def _umask() -> int:
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, seal: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    The file gets the mode a plain open() would give it (0666 minus the umask): mkstemp's 0600 would make
    every artefact unreadable to the rest of a group on a shared filesystem. With `seal`, the finished file's
    content hash is written into it before the rename (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if seal:
            _seal(tmp_path, _kind(path))
        os.chmod(tmp_path, 0o666 & ~_umask())  # after the writer: some (safetensors) recreate the file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _kind(path: Path) -> str:
    try:
        return _KINDS[Path(path).suffix]
    except KeyError:
        raise ValueError(f"{path}: no content hash format for suffix {Path(path).suffix!r}") from None


def _region(path: Path, kind: str) -> tuple[int, bytes]:
    """(offset, bytes) of the part of the file that holds the metadata: safetensors' JSON header, Parquet's
    footer, a JSON file whole. Raises ValueError when the framing itself is broken."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if kind == "safetensors":
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("safetensors header length exceeds the file")
            return 8, f.read(n)
        if kind == "parquet":
            if size < 12:
                raise ValueError("too short for Parquet")
            f.seek(size - 8)
            tail = f.read(8)
            n = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or n > size - 12:
                raise ValueError("no Parquet footer")
            f.seek(size - 8 - n)
            return size - 8 - n, f.read(n)
        return 0, f.read()


def _digest(path: Path, at: int) -> str:
    """xxh3-128 of the file with the 32 bytes at `at` read as the placeholder. Hashed from a read-only mmap:
    no copy out of the page cache (about 2.5x the rate of read() into a buffer on the project's CPU)."""
    import mmap

    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                h.update(view[:at])
                h.update(_PLACEHOLDER)
                h.update(view[at + len(_PLACEHOLDER):])
            finally:
                view.release()
    return h.hexdigest()


def _find_digest(path: Path, kind: str) -> tuple[int, str] | None:
    """(file offset, stored hex digest) of the one digest entry, None when the file has none."""
    start, data = _region(path, kind)
    found = list(_DIGEST_RE.finditer(data))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{len(found)} {HASH_KEY} entries")
    m = found[0]
    return start + m.start(2), m.group(2).decode()


def _seal(path: Path, kind: str) -> None:
    located = _find_digest(path, kind)
    if located is None or located[1] != _PLACEHOLDER.decode():
        raise ValueError(f"{path}: the writer did not put the {HASH_KEY} placeholder into the file")
    at = located[0]
    digest = _digest(path, at)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())


def placeholder_metadata() -> dict[str, str]:
    """The metadata entry a sealed writer adds (its value is replaced by the digest on sealing)."""
    return {HASH_KEY: _PLACEHOLDER.decode()}


def verify(path: str | os.PathLike, rebuild_hint: str) -> None:
    """Raise ArtefactError (naming the file and `rebuild_hint`) unless the file's bytes hash to its recorded
    digest. Costs one sequential read of the file (xxh3 runs at several GB/s; see the README)."""
    path = Path(path)
    try:
        located = _find_digest(path, _kind(path))
    except FileNotFoundError:
        raise ArtefactError(f"{path}: missing; {rebuild_hint}") from None
    except ValueError as err:
        raise ArtefactError(f"{path}: corrupt ({err}); {rebuild_hint}") from None
    if located is None:
        raise ArtefactError(f"{path}: no content hash recorded (written by an older moesweep or by something "
                            f"else); {rebuild_hint}")
    at, stored = located
    actual = _digest(path, at)
    if actual != stored:
        raise ArtefactError(f"{path}: content hash mismatch (recorded {stored}, file hashes to {actual}): the file "
                            f"changed after it was written; {rebuild_hint}")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Keys keep their insertion order (a cell's summary order becomes the column order of cells.parquet);
    the content hash is the last key."""
    if HASH_KEY in obj:
        raise ValueError(f"{HASH_KEY} is written by write_json itself")
    with atomic_path(path, seal=True) as tmp:
        tmp.write_text(json.dumps({**obj, **placeholder_metadata()}, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, rebuild_hint: str = "") -> dict:
    """A JSON artefact written by write_json, its content hash verified and removed."""
    hint = rebuild_hint or "rebuild it"
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtefactError(f"{path}: missing. {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtefactError(f"{path}: not valid JSON ({err}). {hint}") from None
    if not isinstance(obj, dict):
        raise ArtefactError(f"{path}: a JSON {type(obj).__name__}, expected an object; {hint}")
    verify(path, hint)
    obj.pop(HASH_KEY, None)
    return obj


def write_parquet(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame or pyarrow Table atomically, sealed with its content hash."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **placeholder_metadata()})
    with atomic_path(path, seal=True) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike, rebuild_hint: str, columns: list[str] | None = None):
    """A Parquet artefact as a pandas DataFrame, its content hash verified first."""
    import pandas as pd

    verify(path, rebuild_hint)
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as err:  # pyarrow raises several types for truncated or foreign files
        raise ArtefactError(f"{path}: unreadable Parquet file ({err}); {rebuild_hint}") from None


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, seal=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**metadata, **placeholder_metadata()})


def verify_cached(hints: dict[str, str], cache_file: str | os.PathLike) -> None:
    """Verify every existing file of `hints` ({path: rebuild command}) whose stat has changed since it last
    verified; raise ArtefactError for the first mismatch.

    Run when the DAG is built, so a corrupt artefact is found by the next run even when no job would read it.
    A file is re-hashed only when its inode, size, mtime or ctime differ from those recorded in `cache_file`
    when it last verified: any write through the file system changes the ctime, which no user can set back
    (restoring the mtime, as a careful forger would, sets it). What a stat cannot see, a byte flipped by the
    disk itself, is still caught by the readers, which hash every artefact they open.
    """
    cache_file = Path(cache_file)
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}  # no or unreadable record: every file is hashed again, nothing is trusted
    changed = False
    for path, hint in hints.items():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # missing: Snakemake rebuilds it when something needs it
        key = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if cache.get(path) == key:
            continue
        verify(path, hint)
        cache[path], changed = key, True
    if changed:
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
