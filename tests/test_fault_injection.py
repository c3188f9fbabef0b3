"""PRETRAIN_FAULT names one fault at one point, and nothing else fires."""

from __future__ import annotations

import pytest

from pretrain.fault_injection import fault_at


@pytest.mark.parametrize(
    ("value", "kind", "where", "fires"),
    [
        ("kill:7", "kill", 7, True),
        ("kill:7", "kill", 17, False),  # a step number that merely ends in the asked one
        ("kill:17", "kill", 7, False),
        ("kill:7", "kill_scoring", 7, False),  # a kind that merely starts with the asked one
        ("kill_scoring:1", "kill", 1, False),
        ("crash_saving:phase-2", "crash_saving", "phase-2", True),
        ("crash_saving:phase-2", "crash_saving", "step-2", False),
        ("", "kill", 0, False),
    ],
)
def test_a_fault_fires_only_at_its_kind_and_point(monkeypatch, value, kind, where, fires):
    monkeypatch.setenv("PRETRAIN_FAULT", value)
    assert fault_at(kind, where) is fires


def test_no_fault_in_a_run_without_the_variable(monkeypatch):
    monkeypatch.delenv("PRETRAIN_FAULT", raising=False)
    assert not fault_at("kill", 1)
