"""The plan cache: the best plan per CacheKey, in one JSON file under the user cache directory.

Location: $DELTAFLEX_CACHE_DIR, else $XDG_CACHE_HOME/deltaflex, else ~/.cache/deltaflex.
Several installs (other torch versions, other GPUs of a shared home) may share the file, so entries
for other environments are kept, only never used here.

Writes hold an exclusive lock (fcntl) across read-modify-write and replace the file atomically
(temp file + rename), so concurrent tuners never lose each other's entries or leave a torn file.
Reads never raise: a corrupt, truncated or foreign file, or an entry tuned under other versions, is
reported once per process as a PlanCacheWarning and ignored. Each process reads the file once and
re-reads it after its own writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

from deltaflex.plan import Plan

from .key import CacheKey

SCHEMA = 1
FORMAT = "deltaflex-plan-cache"
FILE_NAME = f"plans-v{SCHEMA}.json"  # a future schema gets its own file rather than clobbering this one
MODES = ("fwd", "fwdbwd")


class PlanCacheWarning(UserWarning):
    pass


def cache_dir() -> Path:
    """$DELTAFLEX_CACHE_DIR, else $XDG_CACHE_HOME/deltaflex, else ~/.cache/deltaflex."""
    if os.environ.get("DELTAFLEX_CACHE_DIR"):
        return Path(os.environ["DELTAFLEX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltaflex"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A tuned plan and the evidence for it."""

    key: CacheKey
    plan: Plan
    time_ms: float  # median time of the plan at `shape`, in `mode`
    default_ms: float  # the default plan's, measured in the same process
    mode: str  # "fwd" or "fwdbwd"
    shape: str  # the shape it was tuned at, e.g. "8x2048x32x64"
    error: float  # worst relative error against the float64 oracle in the correctness check
    trials: int
    tuned_at: str  # ISO 8601, UTC

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "key": self.key.to_dict(), "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data) -> Entry:
        """Raises TypeError / ValueError on anything but an entry written by to_dict."""
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("not a plan cache entry")
        numbers = [data[n] for n in ("time_ms", "default_ms", "error")]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError("plan cache entry times and error must be finite non-negative numbers")
        if data["mode"] not in MODES or not isinstance(data["trials"], int):
            raise ValueError("plan cache entry has a bad mode or trial count")
        if not isinstance(data["shape"], str) or not isinstance(data["tuned_at"], str):
            raise ValueError("plan cache entry has a bad shape or date")
        return cls(**{**data, "key": CacheKey.from_dict(data["key"]), "plan": Plan.from_dict(data["plan"])})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse(text: str, source: str) -> tuple[list[Entry], list[str]]:
    """Entries of a cache file's text and the problems found; a problem with the whole file
    leaves no entries."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [f"{source} is corrupt or truncated ({e})"]
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        return [], [f"{source} is not a deltaflex plan cache"]
    if data.get("schema") != SCHEMA:
        return [], [f"{source} has plan cache schema {data.get('schema')!r}, this deltaflex reads {SCHEMA}"]
    entries, bad = [], 0
    for item in data["entries"]:
        try:
            entries.append(Entry.from_dict(item))
        except (TypeError, ValueError):
            bad += 1
    return entries, [f"{source}: {bad} invalid entries ignored"] if bad else []


def dumps(entries: list[Entry]) -> str:
    return json.dumps({"format": FORMAT, "schema": SCHEMA, "entries": [e.to_dict() for e in entries]}, indent=1)


_reported: set[str] = set()
_tables: dict[Path, dict[CacheKey, Entry]] = {}  # per cache file: what this process read
_generation = 0  # bumped by every write and forget_loaded, so memoised lookups (auto.py) start afresh


def generation() -> int:
    return _generation


def _set_table(path: Path, table: dict[CacheKey, Entry]) -> None:
    global _generation
    _tables[path] = table
    _generation += 1


def warn_once(message: str) -> None:
    """A PlanCacheWarning, once per process per message."""
    if message not in _reported:
        _reported.add(message)
        warnings.warn(message, PlanCacheWarning, stacklevel=3)


class PlanCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.path = self.directory / FILE_NAME

    # Reading: never raises, reports problems once.

    def _read(self) -> tuple[list[Entry], bool]:
        """(entries, whether the file as a whole is unusable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return [], False
        except (OSError, UnicodeDecodeError) as e:
            warn_once(f"plan cache {self.path} cannot be read ({e}); ignored")
            return [], True
        entries, problems = parse(text, f"plan cache {self.path}")
        for problem in problems:
            warn_once(problem + "; ignored")
        return entries, bool(problems) and not entries

    def entries(self) -> list[Entry]:
        return self._read()[0]

    def _table(self) -> dict[CacheKey, Entry]:
        if self.path not in _tables:
            _tables[self.path] = {e.key: e for e in self.entries()}
        return _tables[self.path]

    def lookup(self, key: CacheKey) -> Entry | None:
        """The entry for key, from this process's copy of the file."""
        table = self._table()
        entry = table.get(key)
        if entry is None:
            stale = [e for e in table.values() if e.key.same_target(key)]
            if stale:
                env = stale[0].key.env
                warn_once(
                    f"plan cache {self.path} has a plan for {key.env.device}, {key.describe()} tuned under other versions "
                    f"(torch {env.torch}, triton {env.triton or '-'}, deltaflex {env.deltaflex}); "
                    f"ignored; run `deltaflex tune` again to tune for this one"
                )
        return entry

    # Writing: locked, atomic.

    @contextlib.contextmanager
    def _locked(self):
        import fcntl  # here, not at the top: `import deltaflex` must not need it (Windows has none)

        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / (FILE_NAME + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: list[Entry]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=FILE_NAME + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(dumps(entries))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from a shared home's other users
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _set_table(self.path, {e.key: e for e in entries})

    def _update(self, change) -> None:
        with self._locked():
            entries, unusable = self._read()
            if unusable and self.path.exists():
                # Keep the bad file for inspection rather than overwrite it.
                aside = self.path.with_name(f"{FILE_NAME}.bad-{int(time.time())}")
                os.replace(self.path, aside)
                warn_once(f"plan cache {self.path} was unusable and has been moved to {aside}")
            self._write(change(entries))

    def save(self, *new: Entry) -> None:
        """Adds entries, replacing those with the same keys."""
        keys = {e.key for e in new}
        self._update(lambda entries: [e for e in entries if e.key not in keys] + list(new))

    def remove(self, keys) -> None:
        keys = set(keys)
        self._update(lambda entries: [e for e in entries if e.key not in keys])

    def clear(self) -> int:
        """Removes every entry; returns how many there were."""
        count = len(self.entries())
        self._update(lambda entries: [])
        return count


def forget_loaded() -> None:
    """Makes the next lookup re-read the cache files (tests; after another process wrote)."""
    global _generation
    _tables.clear()
    _reported.clear()
    _generation += 1
