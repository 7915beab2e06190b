"""The command's process settings, in this process: threads, and how a signal becomes ``Interrupted``. The real
signals, at start-up, mid-pass and while writing, are sent to real commands in test_faults.py."""

import os
import signal

import pytest

from nextrap.runtime import process
from nextrap.runtime.process import Interrupted, check_interrupted, deferred_interrupts


def test_threads_are_the_usable_physical_cores():
    n = process.threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("given,expected", [({"NEXTRAP_THREADS": "3"}, "3"), ({"OMP_NUM_THREADS": "5"}, "5"),
                                            ({}, str(process.threads()))])
def test_the_command_sets_threads_before_torch_loads_and_leaves_openmp_waiting_as_it_is(given, expected, monkeypatch):
    handlers = []
    monkeypatch.setattr(process.signal, "signal", lambda sig, handler: handlers.append(sig))
    monkeypatch.setattr(process.sys, "argv", ["/venv/bin/nextrap", "fit"])
    for name in ("NEXTRAP_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    process.at_import()
    assert os.environ["OMP_NUM_THREADS"] == expected and "OMP_WAIT_POLICY" not in os.environ  # libgomp's default
    assert handlers == [signal.SIGINT, signal.SIGTERM]


def test_a_library_user_keeps_their_signals_and_threads(monkeypatch):
    monkeypatch.setattr(process.signal, "signal", lambda *a: pytest.fail("a library import changed a signal handler"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    process.at_import()  # this process is pytest, not the command
    assert "OMP_NUM_THREADS" not in os.environ


def test_a_signal_waits_for_the_end_of_a_deferred_block_and_is_remembered(monkeypatch):
    monkeypatch.setattr(process, "_raised", None)
    done = []
    with pytest.raises(Interrupted) as caught:
        with deferred_interrupts():
            process._raise(signal.SIGTERM, None)  # what the handler does when the signal comes
            done.append("renamed")
    assert done == ["renamed"] and caught.value.signum == signal.SIGTERM
    with pytest.raises(Interrupted):  # swallowed since (safetensors turns it into its own error): raised again
        check_interrupted()


@pytest.mark.parametrize("local_ranks, expected", [(None, 8), ("1", 8), ("2", 4), ("3", 2), ("16", 1)])
def test_ranks_on_one_node_share_its_cores(local_ranks, expected, monkeypatch):
    monkeypatch.setattr(process, "threads", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if local_ranks is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert process.cores() == expected
