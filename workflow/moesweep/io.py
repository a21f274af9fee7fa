"""Atomic file output and safe artefact reading.

Every artefact is written to a temporary name in the destination folder and renamed into place, so a
reader (or a resumed Snakemake run) never sees a half-written file. Nothing here unpickles anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


class ArtefactError(RuntimeError):
    """A cached artefact is missing, corrupt or belongs to something else; the message says how to rebuild."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Keys keep their insertion order (a cell's summary order becomes the column order of cells.parquet)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, rebuild_hint: str = "") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtefactError(f"{path}: missing. {rebuild_hint}".strip()) from None
    except json.JSONDecodeError as err:
        raise ArtefactError(f"{path}: not valid JSON ({err}). {rebuild_hint}".strip()) from None


def write_parquet(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame or pyarrow Table atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
