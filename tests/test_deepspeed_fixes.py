"""DeepSpeed's Muon kernels compile at their first call, not when an engine imports their module
(pretrain/deepspeed_fixes.py); the ZeRO-3 release fix has its own 2-rank test
(distributed/test_zero3_release.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import REPO

from pretrain.deepspeed_fixes import _compile_at_first_call


def test_a_kernel_compiles_once_at_its_first_call(monkeypatch):
    compiled = []

    def fake_compile(fn, **options):
        compiled.append((fn, options))
        return lambda *args, **kwargs: 2 * fn(*args, **kwargs)  # tells a compiled call from a plain one

    def kernel(x, scale=1.0):
        """A kernel's docstring."""
        return x * scale

    monkeypatch.setattr(torch, "compile", fake_compile)
    wrapped = _compile_at_first_call(dynamic=False)(kernel)  # as @compiler.compile(...) does
    assert compiled == [] and wrapped.__doc__ == kernel.__doc__ and wrapped.__wrapped__ is kernel
    assert wrapped(torch.tensor(3.0), scale=2.0).item() == 12.0
    assert wrapped(torch.tensor(1.0)).item() == 2.0
    assert compiled == [(kernel, {"dynamic": False})]


def test_the_muon_module_an_engine_imports_leaves_the_inductor_unloaded():
    # Every engine imports DeepSpeed's Muon optimizer (its ZeRO optimizer check, ZeRO-1/2 gradient
    # reduction); its module-level torch.compile decorators imported torch's inductor (2.2 s a rank)
    code = (
        "import sys; from pretrain import deepspeed_fixes; deepspeed_fixes.apply(); "
        "from deepspeed.runtime.zero.muon import original_muon as m; "
        "print(m.muon_update.__wrapped__.__name__, 'torch._inductor.compile_fx' in sys.modules)"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["muon_update", "False"]
