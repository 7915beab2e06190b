"""torchrun: 1 vs 2 ranks. Wall time of `nextrap fit` on a Qwen2.5-7B-shaped LoRA trajectory as one process and
under `torchrun --standalone --nproc-per-node 2` (gloo, OMP_NUM_THREADS=1 per rank), and whether both wrote the
same fit (trajectory.safetensors byte for byte, the backtest's numbers).

    .venv/bin/python benchmarks/torchrun_scale.py --data /work/bench-dist --layers 8 --checkpoints 16 --max-memory 2GB

The trajectory is ``lora_scale.generate``'s (r 64, fp32, ``checkpoint-0 .. checkpoint-150``); it is written into
``--data`` (or reused from there, from a ``--keep`` run) and deleted at the end unless ``--keep``. Every byte is read once before the first fit, so that both
configurations read from the page cache; the runs alternate (1, 2, 1, 2, ...) for ``--repeats`` rounds. Each
row gives the CPU seconds of all its processes, rank 0's own stage seconds (the fit's ``seconds``) and the
1-minute load average (``os.getloadavg``) before and after it: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lora_scale import METHODS, generate, gb, read_floor  # benchmarks/ is the script's folder


def fit(data: Path, out: Path, ranks: int, max_memory: str, env: dict[str, str]) -> dict:
    """One `nextrap fit` (``ranks`` 1: one process; else under torchrun): wall seconds, the fit's own stage
    seconds (rank 0's) and the load average before and after."""
    runner = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc-per-node={ranks}"]
    shutil.rmtree(out, ignore_errors=True)
    load, cpu = os.getloadavg()[0], _children_cpu()
    t0 = time.perf_counter()
    done = subprocess.run([*runner, "-m", "nextrap.cli", "fit", str(data), "--out", str(out), "--methods", METHODS,
                           "--max-memory", max_memory, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"fit under {ranks} rank(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, "wall": wall, "cpu": _children_cpu() - cpu, "seconds": result["seconds"], "load_before": load,
            "load_after": os.getloadavg()[0], "backtest": result["backtest"]}


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (torchrun's ranks included: it waits for them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-dist"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--checkpoints", type=int, default=16)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (1 process, 2 ranks)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trajectory and fits")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the one-process run (each rank gets 1: the node's cores shared by its ranks)")
    args = ap.parse_args()

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(src)
    data = args.data / f"traj-{args.layers}x{args.checkpoints}"
    try:
        t0 = time.perf_counter()
        weights = sorted(data.glob("checkpoint-*/adapter_model.safetensors"))
        if len(weights) == args.checkpoints:  # a kept trajectory of the same name
            size = sum(f.stat().st_size for f in weights)
        else:
            size = generate(data, args.layers, args.checkpoints, args.rank, torch.float32)
        print(f"{args.layers} layers x {args.checkpoints} checkpoints, r {args.rank}: {gb(size)} ready in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        floor, _ = read_floor(data)  # warms the page cache for both configurations
        print(f"read floor {floor:.1f} s; {os.cpu_count()} CPUs", flush=True)
        rows = []
        for _ in range(args.repeats):
            for ranks in (1, 2):
                threads = str(args.threads if ranks == 1 else 1)
                rows.append(fit(data, args.data / f"fit-{ranks}", ranks, args.max_memory,
                                {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "backtest"}), flush=True)
        same_bytes = (args.data / "fit-1" / "trajectory.safetensors").read_bytes() == \
            (args.data / "fit-2" / "trajectory.safetensors").read_bytes()
        same_backtest = rows[-2]["backtest"] == rows[-1]["backtest"]
        print_table(rows, args, size, same_bytes, same_backtest)
    finally:
        if not args.keep:
            shutil.rmtree(args.data, ignore_errors=True)


def print_table(rows: list[dict], args: argparse.Namespace, size: int, same_bytes: bool, same_backtest: bool) -> None:
    print(f"\n{args.layers} layers x {args.checkpoints} checkpoints, r {args.rank} ({gb(size)}), --methods {METHODS} "
          f"--max-memory {args.max_memory}, backtest on; one process at {args.threads} thread(s), each rank at 1\n")
    print("| ranks | wall | CPU (all processes) | features | predictor | backtest | load before | load after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(f"| {r['ranks']} | {r['wall']:.1f} s | {r['cpu']:.1f} s | {s.get('features', 0):.1f} s | {s.get('predictor', 0):.1f} s | "
              f"{s.get('backtest', 0):.1f} s | {r['load_before']:.1f} | {r['load_after']:.1f} |")
    best = {n: min(r["wall"] for r in rows if r["ranks"] == n) for n in (1, 2)}
    print(f"\nbest wall: 1 process {best[1]:.1f} s, 2 ranks {best[2]:.1f} s, ratio 1/2 = {best[1] / best[2]:.2f}x")
    print(f"trajectory.safetensors byte-identical: {same_bytes}; backtest numbers identical: {same_backtest}")


if __name__ == "__main__":
    main()
