"""Host tensors stay out of direct collectives.

A GPU rank's default process group is NCCL alone, and NCCL reduces no host tensor ("No backend type
associated with device type cpu", seen on an H200: benchmarks/gpu_methods.md). CPU ranks (gloo) take
both, so no run in this suite can show that crash: before it was fixed, every run on two GPU ranks would
have died at its first step. Host tensors go through `pretrain.distributed.all_reduce_sum`, which stages
them through the accelerator; a direct collective is allowed only on a buffer made on the engine's device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pretrain

COLLECTIVES = {
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
}
DEVICE_BUFFERS = {("methods/migu.py", "self.magnitudes")}  # Migu makes it on the engine's device


def direct_collectives(root: Path) -> set[tuple[str, str]]:
    """(file, first argument) of every `dist.<collective>(...)` call outside pretrain/distributed.py."""
    found = set()
    for path in root.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr in COLLECTIVES
                and isinstance(func.value, ast.Name)
                and func.value.id == "dist"
            ):
                found.add((path.relative_to(root).as_posix(), ast.unparse(node.args[0])))
    return found


def test_direct_collectives_take_only_device_buffers():
    assert direct_collectives(Path(pretrain.__file__).parent) == DEVICE_BUFFERS


def test_the_guard_sees_a_host_tensor_reduced_directly(tmp_path):
    (tmp_path / "m.py").write_text("import torch.distributed as dist\ndist.all_reduce(totals, group=g)\n")
    assert direct_collectives(tmp_path) == {("m.py", "totals")}
