"""Workarounds for DeepSpeed bugs that cost our runs, each applied once per process by `apply()`.

ZeRO-3's release memo outlives the trace it was computed from (seen in deepspeed 0.19.8). The parameter
coordinator records the order modules run in (its trace) and, after each module, releases the gathered
parameters that the trace says are not needed again soon. Which ones is memoised per (module, step
index) with `functools.lru_cache` on `__params_to_release`, and nothing clears that memo when the trace
is thrown away and recorded again. An evaluation forward before training records a forward-only trace;
releases computed from it say "release everything", and after the first backward has invalidated that
trace and the next step has recorded the full forward + backward one, the memo still answers the same
(module, step) keys from the forward-only trace. So for the rest of the run every parameter is released
after its forward and all-gathered again in backward: on 2 CPU ranks, backward took 48% longer (13.3 s
against 9.0 s over 60 steps) and the step 37% (benchmarks/zero3_eval_effect.md). Clearing the memo with
the trace makes releases follow the trace in use.

DeepSpeed's Muon kernels are wrapped in `torch.compile` when their module is imported, and that import
comes with every engine whatever its optimizer (deepspeed 0.19.8: ZeRO's optimizer check, ZeRO-1/2's
gradient reduction, ZeRO-3's and bf16's optimizer set-up import the Muon optimizer to ask whether it is
one). The first `torch.compile` call of a process imports torch's inductor: 2.2 s of every engine's start
on a CPU here, in each rank of each launch, for kernels only a Muon run calls. DeepSpeed's decorator
(`runtime.compiler.compile`, used by those kernels only) is replaced by one that calls `torch.compile` at
a kernel's first call: the same compiled function for a Muon run, no inductor for any other.
"""

from __future__ import annotations

import functools

from pretrain.logs import log

_MEMO = "_PartitionedParameterCoordinator__params_to_release"
_applied = False


def apply() -> None:
    global _applied
    if not _applied:
        _clear_release_memo_with_trace()
        _compile_muon_kernels_at_first_call()
        _applied = True


def _clear_release_memo_with_trace() -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    memo = _lru_cache(getattr(PartitionedParameterCoordinator, _MEMO, None))
    clear = getattr(PartitionedParameterCoordinator, "_clear_trace_structures", None)
    if memo is None or clear is None:
        # another DeepSpeed: nothing memoised this way, or it is structured otherwise
        log.debug("deepspeed_fixes: no ZeRO-3 release memo to clear in this DeepSpeed")
        return

    def clear_trace_and_memo(self) -> None:
        clear(self)
        memo.cache_clear()  # the memo is keyed by coordinator too: every engine's entries go

    PartitionedParameterCoordinator._clear_trace_structures = clear_trace_and_memo


def _lru_cache(fn, depth: int = 3):
    """The functools.lru_cache inside `fn`'s decorators (DeepSpeed's NVTX wrapper keeps it in a closure
    cell, without functools.wraps), or None."""
    if fn is None or hasattr(fn, "cache_clear"):
        return fn
    if depth == 0:
        return None
    inner = [getattr(fn, "__wrapped__", None)] + [
        c.cell_contents for c in getattr(fn, "__closure__", None) or ()
    ]
    return next((found for f in inner if callable(f) and (found := _lru_cache(f, depth - 1))), None)


def _compile_muon_kernels_at_first_call() -> None:
    import torch
    from deepspeed.runtime import compiler

    if getattr(compiler, "compile", None) is None or not hasattr(torch, "compile"):
        log.debug("deepspeed_fixes: this DeepSpeed compiles no kernel at import")
        return
    compiler.compile = _compile_at_first_call


def _compile_at_first_call(**options):
    """DeepSpeed's `compiler.compile()`: a decorator, here one that compiles at the first call."""
    return functools.partial(_compiled_at_first_call, **options)


def _compiled_at_first_call(fn, **options):
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return call
