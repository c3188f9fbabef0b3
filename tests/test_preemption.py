"""The stop request a rank reads at every micro-step: a signal, or the launch script's stop file."""

from __future__ import annotations

import os
import signal

from pretrain.preemption import STOP_FILE_ENV, StopRequest


def test_the_stop_file_requests_a_stop_once_it_exists(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    stop = StopRequest()
    assert not stop.requested
    stop_file.touch()
    assert stop.requested and str(stop_file) in stop.signal_name
    stop_file.unlink()  # the script removes it when the launcher has ended; the request stands
    assert stop.requested


def test_without_the_variable_only_a_signal_stops(monkeypatch):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_rank_that_stopped_leaves_the_stop_file_for_its_launch_script(tmp_path, monkeypatch):
    """Another node's signal stopped every rank (one all-reduce): this node's script, asked nothing
    itself, learns from the file that its ranks' exit was a stop, not a failure."""
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    StopRequest().acknowledge()
    assert stop_file.exists()
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "gone" / "stop"))  # the script has ended: no trace
    StopRequest().acknowledge()
    assert not (tmp_path / "gone").exists()
