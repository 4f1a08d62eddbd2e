"""The inputs of a dataset job as items: folders, files and CSV/Parquet manifests, local or on any
file system pyarrow opens, each file once with its key (path, size, mtime) and the relative path its
outputs mirror."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from ..errors import AudioInputError, ReconError
from ..files.audio import is_audio_file, is_hidden
from .config import Key

_LOGGER = logging.getLogger(__name__)

MANIFEST_EXTENSIONS: Final = (".csv", ".parquet")


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def open_filesystem(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(path)


@dataclass
class Item:
    """One input file, its key, and the relative path its outputs mirror."""

    path: str
    size: int
    mtime_ns: int
    rel: str
    error: str | None = None
    stage: str = "list"

    @property
    def key(self) -> Key:
        return (self.path, self.size, self.mtime_ns)


def _stat(path: str, rel: str) -> Item:
    if is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = open_filesystem(path)
        info = filesystem.get_file_info(inner)
        if info.type != pafs.FileType.File:
            return Item(path, -1, -1, rel, f"{path}: no such file")
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        return Item(path, int(info.size or 0), int(mtime), rel)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Item(path, -1, -1, rel, f"{path}: no such file")
    except OSError as e:
        return Item(path, -1, -1, rel, f"{path}: cannot be read ({e.strerror or e})")
    if not os.path.isfile(path):
        return Item(path, -1, -1, rel, f"{path}: is not a file")
    return Item(path, int(st.st_size), int(st.st_mtime_ns), rel)


def _read_manifest(path: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if is_uri(path):
        filesystem, inner = open_filesystem(path)
        with filesystem.open_input_file(inner) as f:
            table = pacsv.read_csv(f) if inner.lower().endswith(".csv") else pq.read_table(f)
    else:
        table = pacsv.read_csv(path) if path.lower().endswith(".csv") else pq.read_table(path)
    if "path" not in table.column_names:
        raise AudioInputError(f"{path}: manifest has no `path` column (columns: {', '.join(table.column_names)})")
    return [str(p) for p in table.column("path").to_pylist() if p is not None and str(p).strip()]


def _join(base: str, child: str) -> str:
    """`child` as written in a manifest at `base`'s folder: absolute paths and URIs stay as they are."""
    if is_uri(child) or os.path.isabs(child):
        return child
    if is_uri(base):
        return base.rsplit("/", 1)[0] + "/" + child
    return os.path.abspath(os.path.join(os.path.dirname(base), child))


def _rel_from(root: str, path: str) -> str:
    """Path of `path` relative to `root` when inside it, else the path without its anchor or scheme."""
    p = path.split("://", 1)[-1]
    r = root.split("://", 1)[-1].rstrip("/")
    if p.startswith(r + "/"):
        return p[len(r) + 1 :]
    return str(PurePosixPath(p.lstrip("/")))


def _list_folder(root: str) -> list[Item]:
    if is_uri(root):
        from pyarrow import fs as pafs

        filesystem, inner = open_filesystem(root)
        scheme = root.split("://", 1)[0]
        infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
        items = []
        for info in sorted(infos, key=lambda i: i.path):
            rel = info.path[len(inner.rstrip("/")) + 1 :]
            if info.type == pafs.FileType.File and is_audio_file(Path(info.path)) and not is_hidden(PurePosixPath(rel)):
                uri = f"{scheme}://{info.path}"
                mtime = info.mtime_ns if info.mtime_ns is not None else -1
                items.append(Item(uri, int(info.size or 0), int(mtime), rel))
        return items
    from ..files.audio import discover

    return [_stat(os.path.abspath(p), rel.as_posix()) for p, rel in discover([Path(root)], is_audio_file)]


def _is_dir(path: str) -> bool:
    if is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = open_filesystem(path)
        return filesystem.get_file_info(inner).type == pafs.FileType.Directory
    return os.path.isdir(path)


def expand(inputs: Iterable[str]) -> list[Item]:
    """Folders, files and manifests as items, each file once (an unreadable input: one item with its error)."""
    items: list[Item] = []
    for raw in inputs:
        root = raw if is_uri(raw) else os.path.abspath(_local(raw))
        try:
            if _is_dir(root):
                items += _list_folder(root)
            elif root.lower().endswith(MANIFEST_EXTENSIONS):
                paths = [_join(root, p) for p in _read_manifest(root)]
                base = root.rsplit("/", 1)[0] if is_uri(root) else os.path.dirname(root)
                items += [_stat(p, _rel_from(base, p)) for p in paths]
            else:
                items.append(_stat(root, PurePosixPath(root.split("://", 1)[-1]).name))
        except ReconError as e:
            items.append(Item(root, -1, -1, "", str(e)))
        except Exception as e:  # noqa: BLE001 - an unreadable input is one error row, the job goes on
            items.append(Item(root, -1, -1, "", f"{root}: cannot be listed ({type(e).__name__}: {e})"))
    # the same file twice: keep one
    unique: dict[str, Item] = {}
    for item in items:
        unique.setdefault(item.path, item)
    return list(unique.values())


def fail_clashes(items: list[Item]) -> None:
    """reconstruct: inputs whose mirrored outputs would land on one path all fail (stage `plan`)."""
    by_out: dict[str, list[Item]] = {}
    for item in items:
        if item.error is None:
            by_out.setdefault(str(PurePosixPath(item.rel).with_suffix("")), []).append(item)
    for clash in (g for g in by_out.values() if len(g) > 1):
        for item in clash:
            others = ", ".join(o.path for o in clash if o is not item)
            item.error = (
                f"{item.path}: its output would also be written from {others}; rename one or run them separately"
            )
            item.stage = "plan"


def leave_out_inside(items: list[Item], out: Path) -> tuple[list[Item], int]:
    """The items outside OUT (resolved, `out` itself resolved), and how many were inside it.

    OUT inside an input folder (data/ with data/runs/x as OUT) would make the job read its own
    outputs back as inputs on the next run (audio/x.wav becoming audio/audio/x.wav, and so on):
    whatever a job finds under its own output folder is not an input. Leaving them out instead of
    refusing keeps that layout usable. Symlinks and `..` are resolved (each folder once).
    """
    real_dirs: dict[str, str] = {}
    kept: list[Item] = []
    inside = 0
    root = str(out)
    for item in items:
        if not is_uri(item.path):
            folder, name = os.path.split(item.path)
            if folder not in real_dirs:
                real_dirs[folder] = os.path.realpath(folder)
            real = os.path.join(real_dirs[folder], name)
            if os.path.islink(real):
                real = os.path.realpath(real)
            if real == root or real.startswith(root + os.sep):
                inside += 1
                continue
        kept.append(item)
    return kept, inside
