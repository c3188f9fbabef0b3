"""DeepSpeed checkpoints of the full training state, and transformers-format exports of each phase."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.distributed import barrier


def save_checkpoint(engine, run_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
    """All ranks write their shards; DeepSpeed marks `latest` only after its own barrier."""
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, client_state=client_state)


def export_phase(engine, tokenizer, out_dir: Path, zero_stage: int, is_main: bool) -> None:
    """A standalone transformers model (config, safetensors, tokenizer) of the current weights."""
    if zero_stage == 3:
        # ZeRO-3 holds a shard per rank: every rank takes part in gathering the full state dict.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(str(out_dir), state_dict=state)
        tokenizer.save_pretrained(str(out_dir))
    barrier()
