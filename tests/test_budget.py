"""engine/budget: the streamed passes' budget on the host and on a GPU."""

import pytest

from nextrap.engine.budget import device_budget, parse_size


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
