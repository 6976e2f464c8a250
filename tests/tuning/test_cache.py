"""The plan cache: round trips, and bad files or stale entries that are reported once and ignored."""

import dataclasses
import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from deltaflex.plan import Plan
from deltaflex.tuning import cache as cache_module
from deltaflex.tuning.cache import FILE_NAME, Entry, PlanCache, PlanCacheWarning, cache_dir, dumps, parse
from deltaflex.tuning.key import CacheKey, environment


def entry(K=64, plan=Plan(chunk_size=32), env=None, **changes) -> Entry:
    key = CacheKey.for_shape(env or environment("cpu"), torch.float32, 1, 512, 4, K, K)
    fields = dict(key=key, plan=plan, time_ms=1.5, default_ms=2.0, mode="fwdbwd", shape=f"1x512x4x{K}",
                  error=3e-7, trials=5, tuned_at="2026-11-28T00:00:00Z")
    return Entry(**{**fields, **changes})


def fresh_process_view(path):
    cache_module.forget_loaded()
    return PlanCache(path)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAFLEX_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DELTAFLEX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "deltaflex"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "deltaflex"


def test_save_lookup_round_trip(tmp_path):
    cache = PlanCache(tmp_path)
    a, b = entry(K=64), entry(K=128, plan=Plan(chunk_size=128, compile=False))
    cache.save(a, b)
    assert cache.lookup(a.key) == a and cache.lookup(b.key) == b
    cache.save(dataclasses.replace(a, plan=Plan(chunk_size=16)))  # same key: replaced
    view = fresh_process_view(tmp_path)
    assert view.lookup(a.key).plan == Plan(chunk_size=16) and view.lookup(b.key) == b
    assert len(view.entries()) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp files left behind
    assert json.loads((tmp_path / FILE_NAME).read_text())["schema"] == cache_module.SCHEMA


def test_missing_file_is_empty_and_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PlanCache(tmp_path / "none").entries() == []
        assert PlanCache(tmp_path / "none").lookup(entry().key) is None


GOOD = dumps([entry()])


@pytest.mark.parametrize(
    "text,message",
    [
        ("{\"format\": \"deltaflex-pl", "corrupt or truncated"),  # truncated
        (GOOD[: len(GOOD) // 2], "corrupt or truncated"),
        ("\x00\x01garbage", "corrupt or truncated"),
        (json.dumps({"some": "other tool's file"}), "not a deltaflex plan cache"),
        (json.dumps([1, 2, 3]), "not a deltaflex plan cache"),
        (GOOD.replace('"schema": 1', '"schema": 99'), "schema 99"),
    ],
)
def test_bad_files_are_reported_once_and_ignored(tmp_path, text, message):
    (tmp_path / FILE_NAME).write_text(text)
    cache = PlanCache(tmp_path)
    with pytest.warns(PlanCacheWarning, match=message):
        assert cache.lookup(entry().key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert PlanCache(tmp_path).entries() == []
    # A tuner writing afterwards keeps the bad file aside and writes a good one.
    with pytest.warns(PlanCacheWarning, match="unusable and has been moved to"):
        cache.save(entry())
    assert fresh_process_view(tmp_path).lookup(entry().key) == entry()
    assert [p.read_text() for p in tmp_path.glob(FILE_NAME + ".bad-*")] == [text]


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / FILE_NAME).mkdir()  # a directory where the file should be
    with pytest.warns(PlanCacheWarning, match="cannot be read"):
        assert PlanCache(tmp_path).entries() == []


def test_invalid_entries_are_dropped_the_rest_kept(tmp_path):
    good = entry().to_dict()
    bad_plan = {**entry(K=32).to_dict(), "plan": {"chunk_size": 48}}
    bad_time = {**entry(K=16).to_dict(), "time_ms": "fast"}
    nan_time = {**entry(K=8).to_dict(), "time_ms": float("nan")}
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": cache_module.FORMAT, "schema": 1,
                                                   "entries": [good, bad_plan, bad_time, nan_time, 7]}))
    with pytest.warns(PlanCacheWarning, match="4 invalid entries ignored"):
        assert PlanCache(tmp_path).entries() == [entry()]


def test_entry_for_other_versions_is_reported_once_and_ignored(tmp_path):
    here = environment("cpu")
    old = entry(env=dataclasses.replace(here, torch="1.0.0"), plan=Plan(chunk_size=16))
    PlanCache(tmp_path).save(old)
    cache = fresh_process_view(tmp_path)
    with pytest.warns(PlanCacheWarning, match="tuned under other versions \\(torch 1.0.0"):
        assert cache.lookup(entry().key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(entry().key) is None
    cache.save(entry())  # other environments' entries are kept: a shared cache directory serves several installs
    assert {e.key for e in fresh_process_view(tmp_path).entries()} == {old.key, entry().key}


def test_remove_and_clear(tmp_path):
    cache = PlanCache(tmp_path)
    cache.save(entry(K=16), entry(K=32), entry(K=64))
    cache.remove([entry(K=16).key])
    assert {e.key.K for e in cache.entries()} == {32, 64}
    assert cache.clear() == 2 and cache.entries() == [] and cache.lookup(entry(K=32).key) is None


WRITER = textwrap.dedent("""
    import pathlib, sys, time
    sys.path.insert(0, {tests!r})
    from test_cache import entry
    from deltaflex.tuning.cache import PlanCache
    worker, count = int(sys.argv[1]), int(sys.argv[2])
    barrier = pathlib.Path({barrier!r})
    (barrier / f"ready-{{worker}}").touch()
    while not (barrier / "go").exists():  # all start writing together, after the slow imports
        time.sleep(0.001)
    cache = PlanCache({path!r})
    for i in range(count):
        cache.save(entry(K=1 + worker * 1000 + i))
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    workers, count = 2, 25  # each process imports torch: seconds on a busy 2-core CI machine
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = WRITER.format(tests=str(Path(__file__).parent), path=str(tmp_path), barrier=str(barrier))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w), str(count)], stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    while len(list(barrier.glob("ready-*"))) < workers and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    (barrier / "go").touch()
    torn = 0
    while any(p.poll() is None for p in procs):  # meanwhile a reader must never see a torn file
        try:
            text = (tmp_path / FILE_NAME).read_text()
        except FileNotFoundError:
            continue
        torn += bool(parse(text, "cache")[1])
    errors = [p.stderr.read() for p in procs if p.wait() != 0]
    assert not errors, errors
    assert torn == 0
    keys = {e.key.K for e in fresh_process_view(tmp_path).entries()}
    assert keys == {1 + w * 1000 + i for w in range(workers) for i in range(count)}
