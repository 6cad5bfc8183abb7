"""Reading model archives (``.bentomodel``: a compressed tar) without trusting their layout.

Every archive servery reads goes through :func:`extract`: each member is checked with tarfile's
``data`` filter (PEP 706) before anything is written, and the archive is refused as a whole on
the first member the filter rejects: an absolute path or ``..`` leaving the folder, a symbolic
or hard link pointing out of it, a device, FIFO or other special file. What passes is then
extracted with the same filter (which also drops set-uid bits and group/other write access).

This guards the *layout* only. A model archive carries pickles (``joblib``, ``torch``) that run
code when they are loaded, so the store, and any archive imported into it, must come from a
trusted source (docs/security.md, "The model store is trusted").
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from pathlib import Path


class ArchiveError(ValueError):
    """An archive that cannot be read or that holds a member servery refuses; says which."""


def check_members(archive: tarfile.TarFile, dest: Path | str) -> list[tarfile.TarInfo]:
    """Every member of ``archive`` as the ``data`` filter passes it for extraction to ``dest``;
    ArchiveError naming the first member it refuses and why."""
    dest = str(Path(dest).resolve())
    checked = []
    for member in archive.getmembers():
        if member.name.startswith("/"):
            # the filter would strip the slash and extract it inside; no export has one, so it
            # is a crafted archive: refuse it rather than guess what it meant
            raise ArchiveError(f"member {member.name!r} refused: an absolute path")
        try:
            passed = tarfile.data_filter(member, dest)
        except tarfile.FilterError as e:
            raise ArchiveError(f"member {member.name!r} refused: {e}") from None
        if passed is not None:
            checked.append(passed)
    return checked


def extract(path: Path | str, dest: Path | str) -> Path:
    """Extract the tar archive ``path`` (any compression tarfile reads) into the folder ``dest``
    after checking every member (:func:`check_members`); returns ``dest``. Nothing is written
    when a member is refused."""
    path, dest = Path(path), Path(dest)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = check_members(archive, dest)
            dest.mkdir(parents=True, exist_ok=True)
            archive.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        if isinstance(e, tarfile.FilterError):  # a member changed between check and write
            raise ArchiveError(f"{path}: {e}") from None
        raise ArchiveError(f"{path} is not a readable tar archive: {e}") from None
    except ArchiveError as e:
        raise ArchiveError(f"{path}: {e}") from None
    return dest
