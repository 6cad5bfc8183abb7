"""Progress bars of the ``servery`` command's long operations (``llm import-hf`` copies, model
export and import, ``rag ingest``, ``bench`` runs): tqdm on stderr, so stdout keeps only the
result (a table or ``--json``).

A bar shows only where stderr is a terminal (tqdm's ``disable=None``) unless ``--no-progress``
turns it off everywhere: logs and pipes get no carriage-return noise.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

CHUNK = 64 * 2**20
"""Bytes copied between two updates of a copy's bar (a multi-GB weights shard moves visibly)."""


def bar(
    *, total: float | None, unit: str, desc: str, off: bool = False, scale: bool = False
) -> Any:
    """A tqdm bar on stderr (``off``: ``--no-progress``; else shown only on a terminal);
    ``scale``: show ``unit`` with k/M/G prefixes (bytes)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=True if off else None,
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    )


def tree_bytes(path: Path | str) -> int:
    """Bytes of the files under ``path``, links followed (what :func:`copy_tree` copies: a
    Hugging Face cache snapshot is links into its blobs)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # a dangling link: the copy reports it
                pass
    return total


def copy_tree(src: Path | str, dst: Path | str, progress: Any | None = None) -> None:
    """``shutil.copytree(src, dst)``, counting the bytes copied in ``progress`` (a tqdm bar;
    None: a plain copytree). Files are copied in :data:`CHUNK` pieces with ``os.sendfile`` (in
    the kernel, as ``shutil.copyfile`` does), then their metadata as ``copy2`` does."""
    if progress is None:
        shutil.copytree(src, dst)
        return

    def copy(source: str, target: str) -> str:
        with open(source, "rb") as fin, open(target, "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            offset = 0
            while offset < size:
                sent = _send(fout, fin, offset, min(CHUNK, size - offset))
                if sent == 0:
                    break
                offset += sent
                progress.update(sent)
        shutil.copystat(source, target)
        return target

    shutil.copytree(src, dst, copy_function=copy)


def _send(fout: Any, fin: Any, offset: int, count: int) -> int:
    try:
        return os.sendfile(fout.fileno(), fin.fileno(), offset, count)
    except (AttributeError, OSError):  # no sendfile here (or for this file system): read/write
        fin.seek(offset)
        data = fin.read(count)
        fout.write(data)
        return len(data)
