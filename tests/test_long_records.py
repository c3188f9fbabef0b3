"""Long records: documents packed from pieces of their token ids give the blocks and resume positions of
whole documents."""

from __future__ import annotations

import itertools
import random

import pytest

from pretrain.data import _pack, _pack_pieces

# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("seq_len", [1, 3, 7, 16])
def test_pieces_pack_like_whole_documents_and_resume_at_every_boundary(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 40))] for _ in range(30)]

    def pieces(first: int = 0):
        """The documents from `first` on, each cut at random places (empty pieces too)."""
        for ids in docs[first:]:
            cuts = sorted(rng.randrange(0, len(ids) + 1) for _ in range(rng.randrange(0, 4)))
            bounds = [0, *cuts, len(ids)]
            for k, (a, b) in enumerate(itertools.pairwise(bounds)):
                yield ids[a:b], k == len(bounds) - 2

    full = list(_pack(docs, seq_len, 0))
    assert list(_pack_pieces(pieces(), seq_len, 0)) == full
    for i, (_, doc, offset) in enumerate(full):
        rest = list(_pack_pieces(pieces(doc), seq_len, 0, doc, offset))
        assert rest == full[i + 1 :], f"resuming after block {i} at doc {doc} +{offset}"
