"""Out-of-bounds accesses of Triton kernels, caught in Triton's CPU interpreter.

On a GPU a kernel that reads or writes past its tensors may run clean, or fail later with "an
illegal memory access" in whatever launch comes next, depending on where the allocator put things.
In the interpreter every load and store goes through two Python methods: here they first check that
each address the mask lets through lies inside the storage of one of the launch's tensor arguments.
"""

from __future__ import annotations

import contextlib

import numpy as np


class OutOfBounds(AssertionError):
    pass


@contextlib.contextmanager
def bounds_checked():
    """Within the block, every interpreted kernel launch raises OutOfBounds on a stray access."""
    from triton.runtime import interpreter

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    saved = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store
    ranges = {}  # lo -> hi of every tensor argument's (host copy's) storage, for the running launch

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved[0](self, args_dev, kwargs)
        ranges.clear()
        for a in [*args_hst, *kwargs_hst.values()]:
            if hasattr(a, "untyped_storage"):
                storage = a.untyped_storage()
                ranges[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.broadcast_to(np.asarray(mask.data, bool), ptrs.data.shape)]
        if addresses.size == 0:
            return
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        lo = np.array(sorted(ranges), dtype=np.uint64)
        hi = np.array([ranges[x] for x in sorted(ranges)], dtype=np.uint64)
        which = np.searchsorted(lo, addresses, side="right").astype(np.int64) - 1
        inside = (which >= 0) & (addresses + np.uint64(size) <= hi[np.maximum(which, 0)])
        if not inside.all():
            raise OutOfBounds(f"{what} of {int((~inside).sum())} element(s) outside every tensor argument, "
                              f"first at {int(addresses[~inside][0]):#x}")

    def load(self, ptrs, mask, *rest):
        check(ptrs, mask, "load")
        return saved[1](self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return saved[2](self, ptrs, value, mask, *rest)

    executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = init_args, load, store
    try:
        yield
    finally:
        executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = saved
