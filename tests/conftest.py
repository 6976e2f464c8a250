import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # The Triton kernels (deltaflex.kernels) run in Triton's CPU interpreter where there is no GPU;
    # it must be on before the kernels are defined, i.e. before any test imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (stable across runs of the same test), so inputs are fresh random
    # draws rather than one fixed tensor reused everywhere.
    torch.manual_seed(hash(request.node.nodeid) % 2**31)


@pytest.fixture(autouse=True)
def _kernels_bounds_checked():
    # In Triton's interpreter every kernel access is checked against its tensor arguments: an
    # out-of-bounds access fails the test here instead of corrupting a GPU run at random.
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from interpreter_bounds import bounds_checked

    with bounds_checked():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _private_plan_cache(tmp_path_factory, monkeypatch):
    # No test reads or writes the user's plan cache; each gets an empty one of its own.
    from deltaflex.tuning import cache

    monkeypatch.setenv("DELTAFLEX_CACHE_DIR", str(tmp_path_factory.mktemp("deltaflex-cache")))
    cache.forget_loaded()
    yield
    cache.forget_loaded()


def pytest_runtest_logreport(report):
    # With DELTAFLEX_FAILURE_LOG set (GPU sessions), every failure is written the moment it happens,
    # so a run cut short by a time limit still says what failed and why.
    path = os.environ.get("DELTAFLEX_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
    # DELTAFLEX_DURATIONS_LOG: each test's call time as it finishes (--durations reports only at the end)
    path = os.environ.get("DELTAFLEX_DURATIONS_LOG")
    if path and report.when == "call":
        with open(path, "a") as f:
            f.write(f"{report.duration:.2f} {report.nodeid}\n")
