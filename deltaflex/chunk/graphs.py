"""The compiled chunk graphs replayed under CUDA graphs, captured once per input signature.

A compiled chunk graph runs its state pass as a loop of small kernels launched from the host, and
on a GPU it is the launches, not the work, that cost (docs/design-compiled.md). Capturing the
compiled call in a CUDA graph replays every launch at device speed. The capture is per input
signature (shapes, dtypes, device), not a recompile: one compiled graph with symbolic B and T still
serves every shape, and a new shape costs one capture (milliseconds) instead of a compile.

Inputs are copied into the capture's static buffers before each replay; outputs are the capture's
own buffers, valid until the next replay of the same signature, so callers copy out what they keep.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

MAX_CAPTURES = 8  # per process; the least recently used capture (and its memory) goes first


class CapturedCall:
    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        leaves, self.spec = tree_flatten(args)
        self.static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args = tree_unflatten(self.static, self.spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and warm up outside the capture
            for _ in range(2):
                fn(*static_args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*static_args, **kwargs)

    def __call__(self, args: tuple):
        for dst, src in zip(self.static, tree_flatten(args)[0]):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        return self.out


_captures: OrderedDict = OrderedDict()


def _signature(args: tuple) -> tuple:
    leaves, spec = tree_flatten(args)
    return str(spec), tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves)


def replay(fn: Callable, args: tuple, kwargs: dict):
    """fn(*args, **kwargs), captured in a CUDA graph on its first call with this signature."""
    key = (fn, tuple(sorted(kwargs.items())), _signature(args))
    call = _captures.get(key)
    if call is None:
        call = _captures[key] = CapturedCall(fn, args, kwargs)
        if len(_captures) > MAX_CAPTURES:
            _captures.popitem(last=False)
    _captures.move_to_end(key)
    return call(args)
