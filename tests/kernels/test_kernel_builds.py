"""Every kernel compiles for the H200 (sm_90) as torch.compile launches it, on the CPU: Triton's
own compiler, no GPU needed. torch.compile hands Python floats (scale) to kernels as fp64, which
once turned a float32 accumulator into float64 and broke the state pass's backward under compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[2] / "benchmarks" / "kernel_resources.py"


@pytest.mark.parametrize("float_arg", ["fp64"])
def test_every_kernel_compiles_for_sm90(float_arg):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(TOOL), "--dims", "100", "--chunk-sizes", "32", "--float-arg", float_arg],
                         capture_output=True, text=True, env=env, timeout=600)
    # (exit status 1 also flags spills: a speed matter, measured on the GPU, not a failure here)
    assert "FAILED" not in run.stdout and "Traceback" not in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
    # every op's kernels were built: 10 on the chunk layout; on the caller's, and on packed sequences
    # there, 9 of the stage ops and 10 of the fused path's (its forward as 3 launches and as 2, the
    # output in the state pass; 5 backward), 5 of its forward with the two-level state pass (segments.py)
    assert run.stdout.count("C=32") == 10 + 2 * (9 + 10 + 5)


def test_torch_compile_sees_what_every_kernel_writes():
    """Inductor reads each kernel's IR to learn which arguments it writes; where that trace fails it
    assumes every argument is written and clones them all, which on the H200 (torch 2.11) broke
    compiling graphs with Triton plans."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(TOOL), "--mutations", "--dims", "32,100", "--chunk-sizes", "16,64"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
    # at four shapes: 9 ops on the chunk layout; 8 stage ops and the 4 fused ones (the forward with each state
    # pass and with the output in the one-level pass, the backward) on the caller's, and packed
    assert run.stdout.count(" ok") == 4 * (9 + 2 * (8 + 4))
