"""The job's tables on disk: Parquet shards of rows keyed by (path, size, mtime_ns), written
atomically under names derived from their keys, read back whole, and compacted."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from ..files.audio import atomic_path
from .config import ERRORS_DIR, KEY_COLUMNS, RESULT_DIRS, Key, audio_rel
from .listing import Item

_LOGGER = logging.getLogger(__name__)


def keys_digest(keys: Iterable[Key]) -> str:
    return hashlib.sha256("\n".join(f"{p}\t{s}\t{m}" for p, s, m in sorted(keys)).encode()).hexdigest()


def shard_name(keys: Iterable[Key], kind: str = "") -> str:
    """part-<20 hex>.parquet from the keys; `kind` gives shards of one folder that hold other rows of the
    same keys (OUT/outputs: a run's plan, a batch's written audio) names of their own."""
    digest = keys_digest(keys)
    if kind:
        digest = hashlib.sha256(f"{kind}:{digest}".encode()).hexdigest()
    return f"part-{digest[:20]}.parquet"


def table_keys(table: Any) -> list[Key]:
    return list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))


def write_shard(folder: Path, table: Any, name: str | None = None) -> Path:
    """Write a table atomically as folder/`name` (default: part-<hash of its keys>.parquet).

    The graph workers name both of a batch's shards (results and errors) after the whole batch's
    keys, so a batch that runs again replaces its own shards whatever its outcome this time.
    """
    import pyarrow.parquet as pq

    path = folder / (name or shard_name(table_keys(table)))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def read_table(folder: Path, columns: Sequence[str] | None = None) -> Any:
    """All shards of a folder as one table (None when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in _shards(folder)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def read_keys(folder: Path) -> set[Key]:
    table = read_table(folder, KEY_COLUMNS)
    return set() if table is None else set(table_keys(table))


def compact(folder: Path, drop: Callable[[Key], bool], dedupe: bool = True) -> None:
    """Remove rows `drop` selects and repeated keys (the first row of a key in shard-name order stays);
    `dedupe=False` keeps repeated keys (OUT/outputs holds several rows of one key: planned, written).

    Plans from the key columns only, then writes each changed shard's kept rows under a new name
    (never onto an existing shard), and only then removes the old shards. A crash in between leaves
    repeated keys, which the next compaction removes: a key is never lost.
    """
    import pyarrow.parquet as pq

    seen: set[Key] = set()
    plan: list[tuple[Path, list[bool]]] = []
    for shard in _shards(folder):
        keep = []
        for k in table_keys(pq.read_table(shard, columns=list(KEY_COLUMNS))):
            keep.append(not drop(k) and not (dedupe and k in seen))
            seen.add(k)
        if not all(keep):
            plan.append((shard, keep))
    if not plan:
        return
    existing = {p.name for p in _shards(folder)}
    for shard, keep in plan:
        if any(keep):
            table = pq.read_table(shard).filter(keep)
            salt = 0
            while True:  # a name no shard has: never overwrite rows another shard holds
                digest = keys_digest(table_keys(table))
                name = f"part-{hashlib.sha256(f'{digest}:{shard.name}:{salt}'.encode()).hexdigest()[:20]}.parquet"
                if name not in existing:
                    break
                salt += 1
            existing.add(name)
            write_shard(folder, table, name)
    for shard, _ in plan:
        shard.unlink()


def done_keys(out: Path, mode: str) -> tuple[set[Key], set[Key]]:
    """Keys with a result row, and keys with an error row but no result row."""
    result = read_keys(out / RESULT_DIRS[mode])
    return result, read_keys(out / ERRORS_DIR) - result


def error_table(rows: Sequence[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "size": pa.array([r["size"] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r["mtime_ns"] for r in rows], pa.int64()),
            "stage": pa.array([r["stage"] for r in rows], pa.string()),
            "message": pa.array([r["message"] for r in rows], pa.string()),
        }
    )


PLANNED: Final = "plan"
WRITTEN: Final = "written"


def outputs_table(items: Sequence[Item]) -> Any:
    """reconstruct: the key of each input and the audio file it is about to write, relative to OUT
    (OUT/outputs, under `shard_name(keys, PLANNED)`). A planned row owns nothing (its output size and
    mtime are null): it lets a later run find the temporary files a killed one left."""
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([i.path for i in items], pa.string()),
            "size": pa.array([i.size for i in items], pa.int64()),
            "mtime_ns": pa.array([i.mtime_ns for i in items], pa.int64()),
            "output": pa.array([audio_rel(i.rel) for i in items], pa.string()),
            "output_size": pa.array([None] * len(items), pa.int64()),
            "output_mtime_ns": pa.array([None] * len(items), pa.int64()),
        }
    )


def written_table(rows: Sequence[dict[str, Any]]) -> Any:
    """reconstruct: audio a graph worker wrote (OUT/outputs, under `shard_name(batch keys, WRITTEN)`):
    each input's key, its output relative to OUT, and the size and mtime the file had right after it
    was written. What the job owns in OUT/audio is what this and OUT/done record, while the file is
    still of that size and mtime."""
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "size": pa.array([r["size"] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r["mtime_ns"] for r in rows], pa.int64()),
            "output": pa.array([r["output"] for r in rows], pa.string()),
            "output_size": pa.array([r["output_size"] for r in rows], pa.int64()),
            "output_mtime_ns": pa.array([r["output_mtime_ns"] for r in rows], pa.int64()),
        }
    )
