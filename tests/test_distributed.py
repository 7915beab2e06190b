import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from conftest import BASE
from nextrap.runtime.distributed import World, split
from test_fullparam import make_run


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


def _passes(rank: int, size: int, port: int, root: Path, out: dict) -> None:
    """A LoRA trajectory's terms and projections in one rank of ``size``, with the modules this rank read."""
    if size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from nextrap.runtime import distributed
    from nextrap.trajectories.lora import LoraRun

    distributed._WORLD = None
    traj = LoraRun.open(root, budget=None)
    read, factors = set(), traj.factors
    traj.factors = lambda row, names, *a: read.update(names) or factors(row, names, *a)
    c = len(traj.steps) - 1
    terms, t = traj.terms({"linear": traj.difference(c - 2, c - 3, "linear"), "expo": traj.difference(c - 2, None, "expo")}, c - 2, c)
    directions = {m.name: (torch.ones(m.out_features), torch.ones(m.in_features)) for m in traj.modules}
    a = traj.projections(directions, [0, c])
    out[rank] = (sorted(read), {k: vars(v) for k, v in terms.items()}, t, list(a), torch.stack(list(a.values())))
    if size > 1:
        dist.destroy_process_group()


def test_terms_and_projections_split_the_modules_and_give_every_rank_one_process_s_floats(trajectory):
    port, manager = _free_port(), mp.Manager()
    out = manager.dict()
    _passes(0, 1, port, trajectory, out)
    single = out[0]
    mp.spawn(_passes, args=(2, port, trajectory, out), nprocs=2, join=True)
    assert not set(out[0][0]) & set(out[1][0]) and sorted(out[0][0] + out[1][0]) == single[0]  # each module read by one rank
    for rank in (0, 1):
        assert out[rank][1:4] == single[1:4] and torch.equal(out[rank][4], single[4])


def _nextrap(args: list, ranks: int = 1) -> None:
    """``nextrap ARGS`` as one process, or under ``torchrun --nproc-per-node RANKS`` (gloo, one thread per rank)."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    done = subprocess.run([*runner, "-m", "nextrap.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path; nextrap.json without the fit folder's path (it names its fit)."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.name == "nextrap.json":
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "fit"}, sort_keys=True).encode()
        out[str(f.relative_to(folder))] = data
    return out


def _same_fit(one: Path, two: Path) -> None:
    """The same features byte for byte, and the same backtest numbers and fitted models (the manifest's summary)."""
    assert (one / "trajectory.safetensors").read_bytes() == (two / "trajectory.safetensors").read_bytes()
    summary = [json.loads((f / "manifest.json").read_text())["summary"] for f in (one, two)]
    assert summary[0]["backtest"] and summary[0]["backtest"] == summary[1]["backtest"]
    assert summary[0]["models"] == summary[1]["models"]
    for weights in sorted(p.name for p in one.iterdir() if p.suffix == ".safetensors" and p.name != "trajectory.safetensors"):
        assert (one / weights).read_bytes() == (two / weights).read_bytes(), weights  # a trained predictor


def test_torchrun_with_two_gloo_ranks_writes_the_same_lora_fit_and_jumps_as_one_process(trajectory, tmp_path):
    """`torchrun --nproc-per-node 2 ... nextrap fit` splits the feature pass, the backtest's terms and relex's
    projections across the ranks, and `extend` the shards it writes: the fit folder (features, backtest numbers,
    models), the adapter and the sharded merged model are byte-identical to one process's."""
    methods = "linear,next,relex,next-paper"  # next-paper: each rank trains its share of the predictor's groups
    for name, ranks in (("one", 1), ("two", 2)):
        _nextrap(["fit", trajectory, "--out", tmp_path / name, "--methods", methods, "--backtest-folds", 2, "--epochs", 30,
                  "--json"], ranks)
        _nextrap(["extend", "--fit", tmp_path / name, "--method", "relex", "--alpha", "1.5", "--out", tmp_path / f"{name}-adapter"], ranks)
        _nextrap(["extend", "--fit", tmp_path / name, "--method", "next", "--alpha", "0.5,1.5", "--format", "merged", "--base", BASE,
                  "--max-shard-size", "150KB", "--out", tmp_path / f"{name}-merged"], ranks)
    _same_fit(tmp_path / "one", tmp_path / "two")
    assert _files(tmp_path / "one-adapter") == _files(tmp_path / "two-adapter")
    merged = _files(tmp_path / "one-merged")
    assert len([f for f in merged if f.endswith(".safetensors") and "model-" in f]) >= 4  # both ranks wrote shards
    assert merged == _files(tmp_path / "two-merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # nothing else, no temporary folder left
        ["ckpts", *(f"{n}{s}" for n in ("one", "two") for s in ("", "-adapter", "-merged"))])


def test_torchrun_with_two_gloo_ranks_writes_the_same_full_parameter_fit_and_jump_as_one_process(tmp_path):
    """A full-parameter fit under a budget that batches the parameters differently in each rank: the features, the
    backtest (terms and projections split by tensor) and the sharded jumped model are those of one process."""
    run = make_run(tmp_path / "ckpts")
    for name, ranks in (("one", 1), ("two", 2)):
        _nextrap(["fit", run, "--base", BASE, "--out", tmp_path / name, "--methods", "linear,next,relex", "--horizon", 2,
                  "--max-memory", "1MB", "--json"], ranks)
        _nextrap(["extend", "--fit", tmp_path / name, "--method", "relex", "--alpha", "1.5", "--max-shard-size", "100KB",
                  "--out", tmp_path / f"{name}-merged"], ranks)
    _same_fit(tmp_path / "one", tmp_path / "two")
    merged = _files(tmp_path / "one-merged")
    assert len([f for f in merged if "model-" in f]) >= 2 and merged == _files(tmp_path / "two-merged")


def test_an_error_on_one_rank_publishes_nothing_and_is_raised_on_every_rank(tmp_path):
    """``shared_atomic_dir``: a rank that fails while writing fails them all and nothing appears; an output that
    exists is refused on every rank; otherwise rank 0 publishes what every rank wrote."""
    port, manager = _free_port(), mp.Manager()
    out = manager.dict()
    mp.spawn(_shared_writer, args=(2, port, tmp_path, out), nprocs=2, join=True)
    assert out[0][0] == "rank 1 failed: RuntimeError: disk on fire" and out[1][0] == "disk on fire"
    assert out[0][1] == out[1][1] and "already exists" in out[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == [".nextrap-output.json", "part-0", "part-1"]


def _shared_writer(rank: int, size: int, port: int, root: Path, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from nextrap.io.files import shared_atomic_dir
    from nextrap.runtime import distributed

    w, seen = distributed.world(), []
    for target, fail in ((root / "failed", True), (root / "done", False), (root / "done", False)):
        try:
            with shared_atomic_dir(target, w) as tmp:
                (tmp / f"part-{rank}").write_text("x")
                if fail and rank == 1:
                    raise RuntimeError("disk on fire")
        except Exception as e:  # noqa: BLE001 - what each rank saw
            seen.append(str(e))
    out[rank] = seen
    dist.destroy_process_group()
