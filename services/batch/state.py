"""Where batch jobs keep their state: a few key-value, hash and sorted-set operations, on SQLite
(embedded: a file beside the queue's) or on Redis (production: the same server as the queue).

The operations are the ones the job logic needs to stay correct when any process dies at any
point: :meth:`State.hsetnx` (a line's result is recorded once: the first writer wins, so a line
run twice after a crash is still answered once) and :meth:`State.cas` (a job's status changes
only from the value it was read with, so cancel, expiry and completion never overwrite each
other). Values are bytes.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any


class State:
    """The operations both backends implement."""

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def set(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def cas(self, key: str, old: bytes, new: bytes) -> bool:
        """Set ``key`` to ``new`` if it still holds ``old``; True if it did."""
        raise NotImplementedError

    def delete(self, *keys: str) -> None:
        raise NotImplementedError

    def hset(self, name: str, field: str, value: bytes) -> None:
        raise NotImplementedError

    def hsetnx(self, name: str, field: str, value: bytes) -> bool:
        """Set ``field`` unless it is set; True if this call set it."""
        raise NotImplementedError

    def hsetnx_many(self, name: str, items: list[tuple[str, bytes]]) -> list[bool]:
        """:meth:`hsetnx` of each ``(field, value)``, in one round trip; which ones it set."""
        return [self.hsetnx(name, f, v) for f, v in items]

    def hgetall(self, name: str) -> dict[str, bytes]:
        raise NotImplementedError

    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        raise NotImplementedError

    def hlen(self, name: str) -> int:
        raise NotImplementedError

    def hincrby(self, name: str, field: str, amount: int = 1) -> int:
        raise NotImplementedError

    def zadd(self, name: str, member: str, score: float) -> None:
        raise NotImplementedError

    def zrem(self, name: str, member: str) -> None:
        raise NotImplementedError

    def zmembers(self, name: str) -> list[str]:
        """Members by ascending score."""
        raise NotImplementedError


class SqliteState(State):
    """One SQLite file (WAL), one connection shared by this process's threads under a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self._db.isolation_level = None  # autocommit: each statement is its own transaction
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("pragma journal_mode=wal")
            self._db.execute("pragma synchronous=normal")
            self._db.execute("create table if not exists kv (k text primary key, v blob not null)")
            self._db.execute(
                "create table if not exists h (n text not null, f text not null, v blob not null,"
                " primary key (n, f))"
            )
            self._db.execute(
                "create table if not exists z (n text not null, m text not null, s real not null,"
                " primary key (n, m))"
            )

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, key: str) -> bytes | None:
        rows = self._all("select v from kv where k = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set(self, key: str, value: bytes) -> None:
        self._run("insert or replace into kv (k, v) values (?, ?)", (key, value))

    def cas(self, key: str, old: bytes, new: bytes) -> bool:
        return self._run("update kv set v = ? where k = ? and v = ?", (new, key, old)).rowcount == 1

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._db.execute("delete from kv where k = ?", (key,))
                self._db.execute("delete from h where n = ?", (key,))
                self._db.execute("delete from z where n = ?", (key,))

    def hset(self, name: str, field: str, value: bytes) -> None:
        self._run("insert or replace into h (n, f, v) values (?, ?, ?)", (name, field, value))

    def hsetnx(self, name: str, field: str, value: bytes) -> bool:
        cur = self._run("insert or ignore into h (n, f, v) values (?, ?, ?)", (name, field, value))
        return cur.rowcount == 1

    def hsetnx_many(self, name: str, items: list[tuple[str, bytes]]) -> list[bool]:
        set_: list[bool] = []
        with self._lock:  # one transaction: one commit for all of them
            self._db.execute("begin immediate")
            try:
                for f, v in items:
                    cur = self._db.execute(
                        "insert or ignore into h (n, f, v) values (?, ?, ?)", (name, f, v)
                    )
                    set_.append(cur.rowcount == 1)
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
        return set_

    def hgetall(self, name: str) -> dict[str, bytes]:
        return {f: bytes(v) for f, v in self._all("select f, v from h where n = ?", (name,))}

    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        for i in range(0, len(fields), 500):  # SQLite's bound on parameters
            part = fields[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = self._all(f"select f, v from h where n = ? and f in ({marks})", (name, *part))
            found.update((f, bytes(v)) for f, v in rows)
        return [found.get(f) for f in fields]

    def hlen(self, name: str) -> int:
        return int(self._all("select count(*) from h where n = ?", (name,))[0][0])

    def hincrby(self, name: str, field: str, amount: int = 1) -> int:
        with self._lock:
            self._db.execute("begin immediate")
            try:
                row = self._db.execute(
                    "select v from h where n = ? and f = ?", (name, field)
                ).fetchone()
                value = (int(row[0]) if row else 0) + amount
                self._db.execute(
                    "insert or replace into h (n, f, v) values (?, ?, ?)",
                    (name, field, str(value).encode()),
                )
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
        return value

    def zadd(self, name: str, member: str, score: float) -> None:
        self._run("insert or replace into z (n, m, s) values (?, ?, ?)", (name, member, score))

    def zrem(self, name: str, member: str) -> None:
        self._run("delete from z where n = ? and m = ?", (name, member))

    def zmembers(self, name: str) -> list[str]:
        return [m for (m,) in self._all("select m from z where n = ? order by s, m", (name,))]


_CAS = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class RedisState(State):
    """Keys under ``servery:batch:`` in one Redis database (AOF persistence in deploy/)."""

    PREFIX = "servery:batch:"

    def __init__(self, url: str) -> None:
        import redis

        self._r = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30)
        self._cas = self._r.register_script(_CAS)

    def _k(self, key: str) -> str:
        return self.PREFIX + key

    def get(self, key: str) -> bytes | None:
        return self._r.get(self._k(key))  # type: ignore[return-value]

    def set(self, key: str, value: bytes) -> None:
        self._r.set(self._k(key), value)

    def cas(self, key: str, old: bytes, new: bytes) -> bool:
        return bool(self._cas(keys=[self._k(key)], args=[old, new]))

    def delete(self, *keys: str) -> None:
        if keys:
            self._r.delete(*(self._k(k) for k in keys))

    def hset(self, name: str, field: str, value: bytes) -> None:
        self._r.hset(self._k(name), field, value)

    def hsetnx(self, name: str, field: str, value: bytes) -> bool:
        return bool(self._r.hsetnx(self._k(name), field, value))

    def hsetnx_many(self, name: str, items: list[tuple[str, bytes]]) -> list[bool]:
        pipe = self._r.pipeline(transaction=False)
        for f, v in items:
            pipe.hsetnx(self._k(name), f, v)
        return [bool(x) for x in pipe.execute()]

    def hgetall(self, name: str) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = self._r.hgetall(self._k(name))  # type: ignore[assignment]
        return {f.decode(): v for f, v in raw.items()}

    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        if not fields:
            return []
        return self._r.hmget(self._k(name), fields)  # type: ignore[return-value]

    def hlen(self, name: str) -> int:
        return int(self._r.hlen(self._k(name)))  # type: ignore[arg-type]

    def hincrby(self, name: str, field: str, amount: int = 1) -> int:
        return int(self._r.hincrby(self._k(name), field, amount))  # type: ignore[arg-type]

    def zadd(self, name: str, member: str, score: float) -> None:
        self._r.zadd(self._k(name), {member: score})

    def zrem(self, name: str, member: str) -> None:
        self._r.zrem(self._k(name), member)

    def zmembers(self, name: str) -> list[str]:
        return [m.decode() for m in self._r.zrange(self._k(name), 0, -1)]  # type: ignore[union-attr]
