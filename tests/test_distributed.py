import os
import socket

import torch.multiprocessing as mp

from nextrap.runtime.distributed import World, split


def test_split_balances_cost_and_is_a_partition():
    sizes = [100, 1, 50, 50, 3, 98]
    shares = split(sizes, 2, cost=lambda s: s)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 3  # 152 vs 150
    assert split(["a", "b", "c"], 1) == [[0, 1, 2]]


def test_a_single_process_world_is_the_identity():
    w = World()
    assert w.is_main and w.mine([3, 1, 2]) == [3, 1, 2]
    assert w.gather({"x": 1}) == [{"x": 1}] and w.sum([1, 2.5]) == [1.0, 2.5] and w.merge({"a": 1}) == {"a": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from nextrap.runtime import distributed

    w = distributed.world()
    units = [f"m{i}" for i in range(7)]
    mine = w.mine(units, cost=lambda u: int(u[1:]) + 1)
    merged = w.merge({u: int(u[1:]) ** 2 for u in mine})
    out[rank] = (mine, merged, w.sum([rank + 1.0, 10.0]))
    dist.destroy_process_group()


def test_two_gloo_ranks_split_units_and_gather_the_same_results():
    port, manager = _free_port(), mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    (mine0, merged0, sum0), (mine1, merged1, sum1) = out[0], out[1]
    assert sorted(mine0 + mine1) == sorted(f"m{i}" for i in range(7)) and not set(mine0) & set(mine1)
    assert merged0 == merged1 == {f"m{i}": i * i for i in range(7)}
    assert sum0 == sum1 == [3.0, 20.0]


def test_torchrun_with_two_gloo_ranks_writes_the_same_fit_and_jump_as_one_process(trajectory, tmp_path):
    """`torchrun --nproc-per-node 2 ... nextrap fit` splits the feature pass across ranks; rank 0 writes a fit
    folder whose trajectory.safetensors, and the adapter extended from it, are byte-identical to one process's."""
    import subprocess
    import sys

    def fit(out, ranks):
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks else [sys.executable]
        subprocess.run([*runner, "-m", "nextrap.cli", "fit", str(trajectory), "--out", str(out), "--methods", "linear,next",
                        "--json"], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        subprocess.run([sys.executable, "-m", "nextrap.cli", "extend", "--fit", str(out), "--method", "linear", "--alpha", "1.5",
                        "--out", str(out.parent / f"{out.name}-jump")], check=True, capture_output=True)

    fit(tmp_path / "one", 0)
    fit(tmp_path / "two", 2)
    for a, b in (("one/trajectory.safetensors", "two/trajectory.safetensors"),
                 ("one-jump/adapter_model.safetensors", "two-jump/adapter_model.safetensors")):
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes(), a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "one", "one-jump", "two", "two-jump"]  # rank 1 wrote nothing
