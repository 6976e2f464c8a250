"""transformers' kernel-free delta rule, the peer of our compiled plan: `torch_chunk_gated_delta_rule`
(the torch fallback of Qwen3-Next's gated DeltaNet; with g = 0 it is the plain delta rule), eager
or under `torch.compile`. transformers is never a dependency: it is imported on first use.

Its conventions (transformers 5.x), which `delta_rule` below maps ours onto: q, k [B, T, H, K],
v [B, T, H, V], beta and the log-decay g [B, T, H] (our layout); the scale is K^-0.5, fixed; q and
k are L2-normalised inside only with `use_qk_l2norm_in_kernel` (eps 1e-6); initial and final state
[B, H, K, V]; it computes in float32 whatever the inputs' dtype and returns theirs; chunks of 64.

transformers wraps the function in a dispatcher that calls fla's kernel instead when fla is
importable. `inspect.unwrap` reaches the torch function itself (checked by module and name), so
the fallback is what runs here whether fla is installed or not.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

MODULE = "transformers.models.qwen3_next.modeling_qwen3_next"
NAME = "torch_chunk_gated_delta_rule"


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@functools.cache
def fallback():
    """transformers' torch fallback itself, past its dispatcher; ImportError without transformers
    (or if the function is no longer where transformers 5.x keeps it)."""
    import importlib

    module = importlib.import_module(MODULE)
    fn = inspect.unwrap(getattr(module, NAME))
    if fn.__module__ != MODULE or fn.__name__ != NAME:  # a dispatcher we cannot see through
        raise ImportError(f"{MODULE}.{NAME} unwraps to {fn.__module__}.{fn.__name__}, not the torch fallback")
    return fn


def version() -> str:
    import transformers

    return transformers.__version__


def fla_importable() -> bool:
    """Whether transformers would dispatch to fla's kernel here (we call the fallback regardless)."""
    return importlib.util.find_spec("fla") is not None


def describe() -> str:
    """Which code runs, for tables: the torch fallback, and that fla was bypassed where present."""
    bypassed = "; fla importable, bypassed" if fla_importable() else ""
    return f"torch fallback of transformers {version()} ({NAME}, g = 0{bypassed})"


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def delta_rule(q, k, v, beta, *, initial_state=None, output_final_state=False, use_qk_l2norm=False,
               compiled=False):
    """Our delta rule (default scale K^-0.5) through transformers' fallback with g = 0; returns
    (o [B, T, H, V], final state [B, H, K, V] or None)."""
    fn = fallback()
    g = torch.zeros(beta.shape, dtype=torch.float32, device=beta.device)
    return (_compiled(fn) if compiled else fn)(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
