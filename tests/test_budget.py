"""engine/budget: the streamed passes' budget on the host and on a GPU."""

import threading

import pytest
import torch

from nextrap.engine import budget
from nextrap.engine.budget import Meter, Prefetcher, device_budget, parse_size, reads_in_background, spare_cores


def _no_gpu() -> int:
    raise AssertionError("asked a GPU for its free memory on the CPU")


def test_the_cpu_keeps_the_host_budget_and_never_asks_a_gpu():
    assert device_budget(parse_size("2GB"), "cpu", parse_size("1GB"), _no_gpu) == 2_000_000_000


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_streams_within_the_smaller_of_both_budgets(device):
    assert device_budget(parse_size("8GB"), device, parse_size("20GB"), _no_gpu) == 8_000_000_000
    assert device_budget(parse_size("8GB"), device, parse_size("3GB"), _no_gpu) == 3_000_000_000


def test_a_gpu_without_max_gpu_memory_takes_90_percent_of_its_free_memory():
    assert device_budget(parse_size("8GB"), "cuda", None, lambda: 5_000_000_000) == 4_500_000_000
    assert device_budget(parse_size("2GB"), "cuda", None, lambda: 5_000_000_000) == 2_000_000_000


@pytest.mark.parametrize("threads, cores, background", [(1, 2, True), (2, 2, False), (1, 1, False), (3, 3, True),
                                                       (4, 2, True), (2, 16, True)])
def test_a_cpu_pass_reads_in_background_with_a_core_or_enough_threads_to_spare(threads, cores, background):
    assert reads_in_background(torch.device("cpu"), threads, cores) == background
    assert reads_in_background(torch.device("cuda"), threads, cores)


@pytest.mark.parametrize("threads, cores, background, while_reading", [(1, 2, True, 1), (2, 2, False, 2), (3, 2, True, 2),
                                                                   (2, 4, True, 2), (4, 4, True, 3)])
def test_a_pass_lends_its_reader_a_thread_only_without_a_spare_core(threads, cores, background, while_reading,
                                                                    monkeypatch):
    """Reading in between, a pass keeps all torch's threads; a reader thread takes one of them while it runs
    unless a core is left over for it, and it is given back when the reader closes. Items the consumer never
    took are released from the meter, in both modes."""
    monkeypatch.setattr(budget, "cores", lambda: cores)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded: list[int] = []

        def load(job, meter, pin):
            loaded.append(threading.get_ident())
            item = torch.full((4,), float(job))
            meter.add(item.numel() * item.element_size())
            return item

        meter = Meter(None)
        with Prefetcher(range(3), load, torch.device("cpu"), meter) as rd:
            assert rd.background == background
            assert torch.get_num_threads() == while_reading
            assert [(k, float(t[0])) for k, t in rd] == [(0, 0.0), (1, 1.0), (2, 2.0)]
        assert torch.get_num_threads() == threads
        assert (threading.get_ident() in loaded) != background
        meter.sub(meter.held)
        with Prefetcher(range(3), load, torch.device("cpu"), meter) as rd:
            key, item = next(iter(rd))
            meter.sub(item.numel() * item.element_size())  # the consumer lets the first item go, and stops
        assert key == 0 and meter.held == 0
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, threads, cores, spare", [("cpu", 1, 2, 1), ("cpu", 2, 2, 0), ("cpu", 4, 2, 0),
                                                           ("cpu", 2, 16, 14), ("cuda", 8, 16, 15), ("cuda", 1, 1, 0)])
def test_a_side_thread_takes_only_the_cores_torch_leaves(device, threads, cores, spare):
    assert spare_cores(torch.device(device), threads, cores) == spare


def test_readers_closed_out_of_order_give_torch_back_all_its_threads(monkeypatch):
    """Two readers at once (extend's prediction beside its writer) lend one thread in all, and torch has its
    threads back when the last one closes, whichever closes first."""
    monkeypatch.setattr(budget, "cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        def load(job, meter, pin):
            return torch.zeros(1)

        first = Prefetcher(range(2), load, torch.device("cpu"), Meter(None), background=True)
        second = Prefetcher(range(2), load, torch.device("cpu"), Meter(None), background=True)
        assert torch.get_num_threads() == 3
        first.close()
        assert torch.get_num_threads() == 3  # the second still reads
        second.close()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_a_size_that_cannot_be_read_names_its_option():
    from nextrap.core.errors import NextrapError

    with pytest.raises(NextrapError, match="^--max-shard-size 'abc': cannot read the size"):
        parse_size("abc", "--max-shard-size")
