"""Replay (rehearsal), streamed: a share of every step's blocks comes from earlier corpora.

The blocks of a phase are numbered i = 0, 1, 2, ... in the order the global batch takes them (micro-step
by micro-step, rank r taking i = r, r + W, r + 2W, ...: the sharding of `TrainStream`). With share
s = p/q (exact, as a fraction), block i is a replay block when floor((i+1) p/q) > floor(i p/q), so the
first n blocks hold exactly floor(n p/q) replay blocks: the share of any step, and of the phase, is
exact to one block, and the rule depends on i alone, so it is the same for every world size and across
a resume. Replay block j (the j-th one) comes from source j mod S, and is that source's block j div S;
the other blocks are the phase's own domain's blocks in order. Every source is read as a stream of its
packed blocks (its own `TrainStream` of one rank), epoch after epoch, never held in memory.

Sources of phase k: the domains trained in phases before k (not the phase's own), in the order they were
first trained, then the run's `replay.sources` (general corpora that are never a phase).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

from pretrain.config import RunConfig
from pretrain.data import DataError, SkipCounter, TrainStream
from pretrain.shuffle import Shuffle
from pretrain.token_cache import TokenCache

MAX_DENOMINATOR = 10**6  # the share as a fraction: 0.01 is 1/100 exactly, not a binary float


@dataclass(frozen=True)
class ReplaySource:
    name: str
    files: list[str]
    text_field: str


def phase_share(cfg: RunConfig, phase: int) -> Fraction:
    """Phase `phase` (1-based)'s replay share as an exact fraction; 0 when it has nothing to replay."""
    own = cfg.phases[phase - 1].replay_share
    share = cfg.replay.share if own is None else own
    if not replay_sources(cfg, phase):
        return Fraction(0)
    return Fraction(share).limit_denominator(MAX_DENOMINATOR)


def replay_sources(cfg: RunConfig, phase: int) -> list[ReplaySource]:
    current = cfg.phases[phase - 1].domain
    earlier = dict.fromkeys(p.domain for p in cfg.phases[: phase - 1] if p.domain != current)
    domains = [cfg.domain(name) for name in earlier]
    return [ReplaySource(d.name, list(d.train), d.text_field) for d in domains] + [
        ReplaySource(s.name, list(s.train), s.text_field) for s in cfg.replay.sources
    ]


def replay_count(n: int, share: Fraction) -> int:
    """Replay blocks among the first n blocks of a phase."""
    return n * share.numerator // share.denominator


def locate(i: int, share: Fraction, sources: int) -> tuple[int | None, int]:
    """(source number, its block index) of phase block i; source None is the phase's own domain."""
    before = replay_count(i, share)
    if replay_count(i + 1, share) > before:
        return before % sources, before // sources
    return None, i - before


def replay_summary(share: Fraction, names: list[str], blocks: int, seq_len: int) -> dict:
    """What a phase of `blocks` blocks replayed, by the rule: share used and tokens per source."""
    replayed = replay_count(blocks, share)
    per_source = [replayed // len(names) + (s < replayed % len(names)) for s in range(len(names))]
    return {
        "share": float(share),
        "blocks": blocks,
        "replay_blocks": replayed,
        "share_used": replayed / blocks if blocks else 0.0,
        "tokens": {name: n * seq_len for name, n in zip(names, per_source, strict=True)},
    }


class ReplayStream:
    """This rank's batches of a phase with replay: `TrainStream`'s interface (iterate, state_dict, skip).

    `domain` and `sources` are (files, text_field, skip) of the phase's domain and of each source.
    """

    def __init__(
        self,
        domain,
        sources: dict[str, tuple],
        share: Fraction,
        tokenizer,
        seq_len,
        rank,
        world_size,
        micro_batch_size,
        shuffle: Shuffle | None = None,
        cache: TokenCache | None = None,
    ):
        if not 0 < share < 1:
            raise ValueError(f"replay share must be in (0, 1), got {share}")
        files, field, skip = domain
        # the domain must fill a micro-step of all ranks with distinct blocks, as without replay
        need = world_size * micro_batch_size
        # one-rank readers of the whole stream, each shuffled alike on every rank
        read = (tokenizer, seq_len, 0, 1, 1)
        self.readers = {None: TrainStream(files, field, *read, skip, need, shuffle, cache)}
        for n, (files, field, skip) in enumerate(sources.values()):
            self.readers[n] = TrainStream(files, field, *read, skip, None, shuffle, cache)
        self.names = list(sources)
        self.share, self.rank, self.world_size = share, rank, world_size
        self.micro_batch_size = micro_batch_size
        self.skip: SkipCounter | None = domain[2]
        self.next_block = rank  # the phase block this rank takes next
        self.taken = {key: 0 for key in self.readers}  # blocks read from each reader so far

    def __iter__(self) -> Iterator[torch.Tensor]:
        readers = {key: iter(reader) for key, reader in self.readers.items()}
        batch = []
        while True:
            source, index = locate(self.next_block, self.share, len(self.names))
            while self.taken[source] <= index:
                block = next(readers[source])[0]
                self.taken[source] += 1
            batch.append(block)
            self.next_block += self.world_size
            if len(batch) == self.micro_batch_size:
                yield torch.stack(batch)
                batch = []

    def source_skips(self) -> dict[str, SkipCounter]:
        """Each replay source's bad records met so far (the policy 'skip'; none under 'error')."""
        readers = (self.readers[n] for n in range(len(self.names)))
        return {name: r.skip for name, r in zip(self.names, readers, strict=True) if r.skip is not None}

    def state_dict(self) -> dict:
        return {
            "replay": {
                "share": str(self.share),
                "sources": self.names,
                "rank": self.rank,
                "world_size": self.world_size,
                "next_block": self.next_block,
                "taken": {_key(k): n for k, n in self.taken.items()},
            },
            "readers": {_key(k): reader.state_dict() for k, reader in self.readers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("replay")
        mine = self.state_dict()["replay"]
        for key in ("share", "sources", "rank", "world_size"):
            if saved is None or saved[key] != mine[key]:
                raise DataError(
                    f"data stream state is for replay {key}={None if saved is None else saved[key]!r}, "
                    f"this stream has {mine[key]!r}: a resumed run needs the same replay and ranks"
                )
        for k, reader in self.readers.items():
            reader.load_state_dict(state["readers"][_key(k)])
        self.next_block = saved["next_block"]
        self.taken = {k: saved["taken"][_key(k)] for k in self.readers}


def _key(source: int | None) -> str:
    return "domain" if source is None else f"source-{source}"


def reshard_replay_state(states: list[dict], rank: int, world_size: int) -> dict:
    """The state of rank `rank` of `world_size` continuing the replay streams whose ranks saved `states`.

    Rank r of W takes phase blocks r, r + W, ...: after the same number of batches on every rank, the
    next block of the whole batch is the last rank's next block minus its rank. Every rank reads every
    source itself and no rank has read past that block, so the last rank's readers serve any new rank:
    a reader behind the block a rank needs reads forward to it.
    """
    last = states[-1]
    saved = last["replay"]
    boundary = saved["next_block"] - saved["rank"]
    replay = {**saved, "rank": rank, "world_size": world_size, "next_block": boundary + rank}
    return {**last, "replay": replay}
