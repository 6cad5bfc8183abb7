"""Model aliases: named pointers (``production``, ``staging``, ...) at versions in the model store.

BentoML's open-source store has immutable ``name:version`` tags and one ``latest`` pointer. servery
adds aliases, kept per model in ``$BENTOML_HOME/models/<name>/servery-aliases.json`` beside the
versions and BentoML's own ``latest`` file (BentoML lists only the directories there, so it never
sees it): the aliases travel with the store, a mounted volume in Kubernetes included.

The file holds the current aliases and the history of every change (time, alias, new and previous
version, action), so ``rollback`` is one call::

    {"servery_aliases": 1,
     "aliases": {"production": "davxplxkdco64ax4"},
     "history": [{"at": "2026-11-27T08:00:00+00:00", "action": "promote", "alias": "production",
                  "version": "davxplxkdco64ax4", "previous": null}]}

Writes are atomic (a temporary file in the same directory, fsync, ``os.replace``): a crash
mid-write leaves the old file or the new one, never a torn one. Every change is a
read-modify-write under an exclusive ``flock`` on ``servery-aliases.lock``, so two concurrent
promotes (two processes, two machines on one NFS volume with working locks) never lose one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import VERSION_RE, check_model_name

ALIAS_FILE = "servery-aliases.json"
LOCK_FILE = "servery-aliases.lock"
FORMAT = 1
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}\Z")
RESERVED = frozenset({"latest"})  # BentoML's own pointer
DEFAULT_ALIAS = "production"


class AliasError(ValueError):
    """A promote, rollback or lookup that cannot be done; the message says why."""


@dataclass
class Aliases:
    """One model's aliases and the history of their changes (oldest first)."""

    aliases: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        doc = {"servery_aliases": FORMAT, "aliases": self.aliases, "history": self.history}
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Aliases:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise AliasError(f"{source} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("servery_aliases") != FORMAT:
            raise AliasError(f"{source} is not a servery alias file (format {FORMAT})")
        aliases, history = doc.get("aliases", {}), doc.get("history", [])
        if not isinstance(aliases, dict) or not isinstance(history, list):
            raise AliasError(f"{source}: 'aliases' must be an object and 'history' a list")
        for alias, version in aliases.items():
            _check_entry(source, "aliases", {"alias": alias, "version": version}, nullable=False)
        for i, entry in enumerate(history):
            _check_history(source, i, entry)
        return cls(dict(aliases), history)


def _check_entry(source: str, where: str, entry: dict[str, Any], *, nullable: bool) -> None:
    alias = entry.get("alias")
    if not isinstance(alias, str) or alias in RESERVED or not ALIAS_RE.match(alias):
        raise AliasError(f"{source}: {where}: {alias!r} is not a valid alias name")
    for key in ("version", "previous") if nullable else ("version",):
        value = entry.get(key)
        if value is None and nullable:
            continue
        if not isinstance(value, str) or not VERSION_RE.match(value):
            raise AliasError(f"{source}: {where}: {key} {value!r} is not a version id")


def _check_history(source: str, i: int, entry: object) -> None:
    """One history entry as :meth:`AliasStore.promote` and ``rollback`` write it: what
    ``rollback`` and ``servery models show`` read from it must be there and well-formed."""
    where = f"history[{i}]"
    if not isinstance(entry, dict):
        raise AliasError(f"{source}: {where} is not an object")
    action = entry.get("action")
    if action not in ("promote", "rollback"):
        raise AliasError(f"{source}: {where}: action {action!r} is not promote or rollback")
    if not isinstance(entry.get("at"), str):
        raise AliasError(f"{source}: {where}: 'at' must be a time")
    _check_entry(source, where, entry, nullable=True)
    if entry["action"] == "promote" and entry.get("version") is None:
        raise AliasError(f"{source}: {where}: a promote names a version")
    undoes = entry.get("undoes")
    if entry["action"] == "rollback" and (type(undoes) is not int or not 0 <= undoes < i):
        raise AliasError(f"{source}: {where}: 'undoes' must index an earlier entry")


def check_alias(alias: str) -> str:
    if alias in RESERVED or not ALIAS_RE.match(alias):
        raise AliasError(
            f"invalid alias {alias!r}: lowercase letters, digits, '-' and '_', starting with a "
            "letter, at most 63 characters, and not 'latest'"
        )
    return alias


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class AliasStore:
    """Aliases of the models in one BentoML model store directory (``$BENTOML_HOME/models``)."""

    def __init__(self, models_dir: Path | str | None = None) -> None:
        if models_dir is None:
            from bentoml._internal.configuration.containers import BentoMLContainer

            models_dir = BentoMLContainer.model_store_dir.get()
        self.models_dir = Path(models_dir)

    def folder(self, name: str) -> Path:
        """``name``'s folder in the store; AliasError for a name that is not a model name (no
        ``..`` or ``/`` ever becomes a path here)."""
        try:
            return self.models_dir / check_model_name(name)
        except ValueError as e:
            raise AliasError(str(e)) from None

    # --- the store's versions ---------------------------------------------------------------

    def versions(self, name: str) -> list[str]:
        """Stored versions of ``name``, oldest first (by the creation time BentoML recorded).

        A version directory whose ``model.yaml`` cannot be read yet (BentoML creates the directory
        first and copies the files into it) is left out rather than failing the whole listing, so
        a server polling the store never trips over a save in progress.
        """
        from bentoml._internal.models.model import Model

        folder = self.folder(name)
        if not folder.is_dir():
            return []
        found = []
        for d in folder.iterdir():
            if not d.is_dir():
                continue
            try:
                created = Model.from_path(d).info.creation_time
            except Exception:  # incomplete or damaged: not a servable version
                continue
            found.append((created, d.name))
        return [version for _, version in sorted(found)]

    def fingerprint(self, name: str) -> tuple[object, ...]:
        """Cheap change detector for ``name``: stats of its folder, ``latest`` and alias files.

        A new or deleted version changes the folder; BentoML rewrites ``latest`` when a save
        completes; promote/rollback replace the alias file (new inode).
        """
        folder = self.folder(name)
        out: list[object] = []
        for path in (folder, folder / "latest", folder / ALIAS_FILE):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def latest(self, name: str) -> str | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def resolve_version(self, name: str, ref: str) -> str:
        """A stored version of ``name`` from a version id or a unique prefix of one."""
        versions = self.versions(name)
        if not versions:
            raise AliasError(f"no model named {name!r} in the store ({self.models_dir})")
        if ref in versions:
            return ref
        matches = [v for v in versions if v.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AliasError(f"version prefix {ref!r} of {name!r} is ambiguous: {matches}")
        raise AliasError(f"{name!r} has no version {ref!r}; stored: {versions}")

    def resolve(self, name: str, ref: str | None = None) -> tuple[str, str]:
        """``(version, how)`` for ``ref``: an alias, ``latest``, a version or a unique prefix.

        No ``ref`` means the ``production`` alias, or ``latest`` where it is not set; ``how``
        names what decided (``alias:production``, ``latest``, ``version``).
        """
        if ref is None:
            current = self.read(name).aliases.get(DEFAULT_ALIAS)
            if current is not None:
                return current, f"alias:{DEFAULT_ALIAS}"
            ref = "latest"
        if ref == "latest":
            latest = self.latest(name)
            if latest is None:
                raise AliasError(f"no model named {name!r} in the store ({self.models_dir})")
            return latest, "latest"
        current = self.read(name).aliases.get(ref)
        if current is not None:
            return current, f"alias:{ref}"
        return self.resolve_version(name, ref), "version"

    # --- the alias file ---------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.folder(name) / ALIAS_FILE

    def read(self, name: str) -> Aliases:
        """``name``'s aliases (none without a file); AliasError if the file cannot be read, is
        not UTF-8 JSON or not a well-formed alias file."""
        path = self.path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return Aliases()
        except OSError as e:
            raise AliasError(f"cannot read alias file {path}: {e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AliasError(f"alias file {path} is not UTF-8 text (byte {e.start})") from None
        return Aliases.from_json(text, str(path))

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Aliases]:
        """Read-modify-write of ``name``'s aliases under an exclusive lock; written on success."""
        folder = self.folder(name)
        if not folder.is_dir():
            raise AliasError(f"no model named {name!r} in the store ({self.models_dir})")
        with open(folder / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read(name)
                yield current
                self._write(name, current)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, name: str, aliases: Aliases) -> None:
        path = self.path(name)
        fd, tmp = tempfile.mkstemp(prefix=f".{ALIAS_FILE}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(aliases.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    # --- changes ----------------------------------------------------------------------------

    def promote(self, name: str, version: str, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Point ``alias`` of ``name`` at ``version`` (id or unique prefix); returns the change."""
        check_alias(alias)
        target = self.resolve_version(name, version)
        with self._locked(name) as current:
            change = {
                "at": _now(),
                "action": "promote",
                "alias": alias,
                "version": target,
                "previous": current.aliases.get(alias),
            }
            current.aliases[alias] = target
            current.history.append(change)
        return change

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Undo the latest promote of ``alias`` not yet rolled back; returns the change.

        Repeated rollbacks walk back through the promotes; undoing the first promote of an alias
        removes it.
        """
        check_alias(alias)
        with self._locked(name) as current:
            undone = {
                i
                for entry in current.history
                if entry.get("action") == "rollback" and entry.get("alias") == alias
                for i in [entry.get("undoes")]
            }
            for i in range(len(current.history) - 1, -1, -1):
                entry = current.history[i]
                if entry.get("alias") == alias and entry.get("action") == "promote":
                    if i not in undone:
                        break
            else:
                raise AliasError(f"{name!r} has no promote of alias {alias!r} to roll back")
            target = entry.get("previous")
            change = {
                "at": _now(),
                "action": "rollback",
                "alias": alias,
                "version": target,
                "previous": current.aliases.get(alias),
                "undoes": i,
            }
            if target is None:
                current.aliases.pop(alias, None)
            else:
                current.aliases[alias] = target
            current.history.append(change)
        return change


# --- export / import: BentoML's model archives plus the alias file -------------------------------

EXPORT_SUFFIX = ".bentomodel"


def _counted(items: list[Any], progress: Any | None) -> Iterator[Any]:
    """``items``, each counted in ``progress`` (a tqdm bar, or None) once its turn is done."""
    if progress is not None:
        progress.reset(total=len(items))
    for item in items:
        if progress is not None:
            progress.set_postfix_str(str(getattr(item, "name", item)), refresh=False)
        yield item
        if progress is not None:
            progress.update(1)


def export_model(
    store: AliasStore, name: str, dest: Path | str, progress: Any | None = None
) -> list[Path]:
    """Write every version of ``name`` (``bentoml models export``) and its aliases to ``dest``.

    ``bentoml models export`` carries one version and no aliases; this is its servery equivalent:
    ``dest/<name>-<version>.bentomodel`` per version plus ``dest/<name>.servery-aliases.json``.
    ``progress``: a tqdm bar (models/progress.py) counting the versions written.
    """
    import bentoml

    versions = store.versions(name)
    if not versions:
        raise AliasError(f"no model named {name!r} in the store ({store.models_dir})")
    # absolute: bentoml.models.export_model reads a relative path as one under "/"
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for version in _counted(versions, progress):
        path = dest / f"{name}-{version}{EXPORT_SUFFIX}"
        bentoml.models.export_model(f"{name}:{version}", str(path))
        written.append(path)
    aliases = dest / f"{name}.{ALIAS_FILE}"
    aliases.write_text(store.read(name).to_json())
    written.append(aliases)
    return written


def import_models(
    store: AliasStore, src: Path | str, progress: Any | None = None
) -> dict[str, list[str]]:
    """Import what :func:`export_model` wrote into ``src``: versions first, then the aliases.

    Each archive is extracted through :func:`models.archives.extract` (members that would leave
    the folder, links out of it and special files are refused) and the model's own
    ``model.yaml`` names it; a version already in the store is kept as it is. An imported alias
    file (named ``<model>.servery-aliases.json``, the model name checked like any other)
    replaces the model's aliases only where the store has none yet (never silently overwrites a
    live ``production``); otherwise its aliases are reported and left for ``promote``.

    Archives are trusted input: the models in them run code when loaded (docs/security.md).
    ``progress``: a tqdm bar (models/progress.py) counting the archives read.
    """
    import tempfile

    import bentoml
    from bentoml.exceptions import BentoMLException

    from models.archives import ArchiveError, extract

    src = Path(src).resolve()  # see export_model
    imported: dict[str, list[str]] = {}
    for archive in _counted(sorted(src.glob(f"*{EXPORT_SUFFIX}")), progress):
        with tempfile.TemporaryDirectory(prefix="servery-import-") as tmp:
            folder = extract(archive, Path(tmp) / "model")
            try:
                model = bentoml.models.Model.from_path(folder)
            except BentoMLException as e:
                raise ArchiveError(f"{archive} is not a BentoML model archive: {e}") from None
            name, version = model.tag.name, model.tag.version
            if version in store.versions(name):
                continue  # BentoML refuses an existing version; keep the one in the store
            model.save()
        imported.setdefault(name, []).append(version)
    for alias_file in sorted(src.glob(f"*.{ALIAS_FILE}")):
        name = alias_file.name[: -len(f".{ALIAS_FILE}")]
        folder = store.folder(name)  # AliasError for '..' and other non-names
        try:
            text = alias_file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AliasError(f"cannot read {alias_file}: {e}") from None
        incoming = Aliases.from_json(text, str(alias_file))
        missing = set(incoming.aliases.values()) - set(store.versions(name))
        if missing:
            raise AliasError(f"{alias_file}: aliases point at versions not in the store: {missing}")
        with store._locked(folder.name) as current:
            if current.aliases:
                raise AliasError(
                    f"{name!r} already has aliases {current.aliases}; not replaced by "
                    f"{alias_file} (promote by hand)"
                )
            current.aliases.update(incoming.aliases)
            current.history.extend(incoming.history)
    return imported
