import json

import pytest
import torch
from typer.testing import CliRunner

import deltaflex.api
from deltaflex import Plan, delta_rule
from deltaflex.cli import app
from deltaflex.testing import make_inputs
from deltaflex.tuning.cache import PlanCache

runner = CliRunner()


def test_tune_cpu_writes_a_plan_that_auto_then_uses(monkeypatch):
    result = runner.invoke(app, ["tune", "--cpu", "--shape", "1,64,2,16", "--trials", "3"])
    assert result.exit_code == 0, result.output
    assert "tuned plans" in result.output and "saved to" in result.output
    (entry,) = PlanCache().entries()
    assert entry.shape == "1x64x2x16" and entry.trials == 3 and entry.time_ms <= entry.default_ms
    assert json.loads(PlanCache().path.read_text())["entries"][0]["plan"] == entry.plan.to_dict()

    seen, apply = [], deltaflex.api.ChunkDeltaRuleFunction.apply
    monkeypatch.setattr(deltaflex.api.ChunkDeltaRuleFunction, "apply", lambda *a: (seen.extend(x for x in a if isinstance(x, Plan)), apply(*a))[1])
    delta_rule(**make_inputs(1, 64, 2, 16, dtype=torch.float32), plan="auto")
    assert seen == [entry.plan]


def test_tune_stops_at_a_device_fault(monkeypatch):
    # after a sticky CUDA error nothing can run in the process: the shapes after it are not tried
    from deltaflex.tuning import tuner

    calls = []

    def faulting_tune(shape, **kwargs):
        calls.append(shape)
        raise tuner.DeviceFault(f"plan C16 faulted the GPU at {shape}")

    monkeypatch.setattr(tuner, "tune", faulting_tune)
    result = runner.invoke(app, ["tune", "--cpu", "--shape", "1,64,2,16", "--shape", "1,128,2,16", "--trials", "3"])
    assert result.exit_code != 0 and "faulted the GPU" in result.output
    assert len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("args", [["--gpu"], ["--device", "cuda:0"]])
def test_tune_gpu_without_a_gpu_says_so(args):
    result = runner.invoke(app, ["tune", *args, "--shape", "1,64,2,16"])
    assert result.exit_code != 0 and "no CUDA device is available" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "choose what to tune"),
        (["--gpu", "--cpu"], "choose what to tune"),
        (["--cpu", "--device", "cpu"], "choose what to tune"),
        (["--device", "tpu"], "expected cuda, cuda:N or cpu"),
        (["--cpu", "--shape", "1,64"], "B,T,H,K"),
        (["--cpu", "--dtype", "int8"], "expected one of"),
        (["--cpu", "--mode", "bwd"], "Invalid value for '--mode'"),
        (["--cpu", "--trials", "0"], "Invalid value for '--trials'"),
        (["--cpu", "--timeout", "-5"], "Invalid value for '--timeout'"),
    ],
)
def test_tune_rejects_bad_arguments(args, message):
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert PlanCache().entries() == []


def test_tune_help():
    result = runner.invoke(app, ["tune", "--help"])
    assert result.exit_code == 0 and "--gpu" in result.output and "--trials" in result.output
