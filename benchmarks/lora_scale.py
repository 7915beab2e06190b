"""LoRA at 7B scale: time and real peak memory of `nextrap fit` and `extend` on a Qwen2.5-7B-shaped trajectory,
against the read floor (every byte read once), the time to write extend's output, and the dense reference.

    .venv/bin/python benchmarks/lora_scale.py --data /work/bench-data --layers 8 28 --checkpoints 8 16 --max-memory 2GB

For each number of layers it writes a trajectory of PEFT adapters `checkpoint-0 .. checkpoint-{10 (n - 1)}` into
``--data`` (Qwen2.5-7B's 7 projections per layer: q 3584x3584, k and v 512x3584, o 3584x3584, gate and up
18944x3584, down 3584x18944; rank ``--rank``; fp32 as PEFT saves it, or bf16), runs each measurement as its
own process (its real peak RSS: VmHWM at exit) for each number of checkpoints (the first n checkpoints,
linked into a folder of their own), prints one table, and deletes the data unless ``--keep``:

- read floor: every byte of every checkpoint's weights read once, in the same run, just before the fits, twice
  back to back: the faster read (from the page cache, as the fits then read it; the strict floor) is the one the
  ratios use, the first (``cold``, from disk when the cache had dropped the files) is printed beside it;
- fit: ``--methods next,linear,expo,relex`` with the backtest (from 2h + 2 = 12 checkpoints: step 0 is no move), and with
  ``--no-backtest``;
- extend: ``--method next --alpha 1.5`` as an adapter, against writing its adapter_model.safetensors' bytes, also
  less the start-up of a process that imports it (interpreter and torch, timed in the same run);
- dense reference: merging a module's factors and a dense ``torch.linalg.svd`` (float32) of its global delta,
  timed on one module of each shape, scaled to the reference's count (every global, local and target delta of
  every module); the same samples check the streamed features (sigma relative error, |cos| of u and v).

The trajectory is random but drifts plausibly: B grows from 0 (the step-0 adapter) along a turning direction
with a noisy component, A drifts from its random initialisation, each module a different mix of a few random
matrices per shape (so that generating ~10 GB takes a minute, not an hour).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from nextrap.writers.merged import write_safetensors
from nextrap.core.features import Features

SHAPES = (("self_attn.q_proj", 3584, 3584), ("self_attn.k_proj", 512, 3584), ("self_attn.v_proj", 512, 3584),
          ("self_attn.o_proj", 3584, 3584), ("mlp.gate_proj", 18944, 3584), ("mlp.up_proj", 18944, 3584),
          ("mlp.down_proj", 3584, 18944))  # (module, out_features, in_features) of Qwen2.5-7B
PREFIX = "base_model.model.model.layers"
METHODS = "next,linear,expo,relex"
HORIZON = 5
ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16"}


# ----------------------------------------------------------------------------------------------- the trajectory

def generate(root: Path, layers: int, ckpts: int, rank: int, dtype: torch.dtype, seed: int = 0) -> int:
    """Write the trajectory; returns its bytes on disk."""
    g = torch.Generator().manual_seed(seed)
    pools = {}  # per shape: A_0, two drifts of A, three directions of B (unit-scale columns)
    for _, m, n in SHAPES:
        if (m, n) not in pools:
            pools[(m, n)] = ([torch.randn(rank, n, generator=g) / math.sqrt(n) for _ in range(3)],
                             [torch.randn(m, rank, generator=g) / math.sqrt(m * rank) for _ in range(3)])
    mix = torch.randn(layers, len(SHAPES), 6, generator=g)  # each module's own mix of its shape's pool
    noise = torch.randn(ckpts, layers, len(SHAPES), 2, generator=g)
    info = {}
    for layer in range(layers):
        for name, m, n in SHAPES:
            key = f"{PREFIX}.{layer}.{name}"
            info[f"{key}.lora_A.weight"] = ([rank, n], ST_NAMES[dtype])
            info[f"{key}.lora_B.weight"] = ([m, rank], ST_NAMES[dtype])

    def tensors(i: int):
        t = i / max(ckpts - 1, 1)
        turn = 1.2 * t  # the dominant direction turns by about 70 degrees over the run
        for layer in range(layers):
            for k, (name, m, n) in enumerate(SHAPES):
                (a0, a1, a2), (b1, b2, b3) = pools[(m, n)]
                c, e = mix[layer, k], noise[i, layer, k]
                a = a0 * (1 + 0.1 * c[0]) + (0.05 * t * c[1]) * a1 + (0.01 * math.sqrt(t) * e[0]) * a2
                b = (t ** 0.75) * ((math.cos(turn) * c[2]) * b1 + (math.sin(turn) * c[3]) * b2) \
                    + (0.3 * math.sqrt(t) * e[1] * c[4]) * b3
                yield f"{PREFIX}.{layer}.{name}.lora_A.weight", a.to(dtype)
                yield f"{PREFIX}.{layer}.{name}.lora_B.weight", b.to(dtype)

    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [s.split(".")[-1] for s, _, _ in SHAPES],
              "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": "Qwen/Qwen2.5-7B", "task_type": "CAUSAL_LM"}
    total = 0
    for i in range(ckpts):
        folder = root / f"checkpoint-{10 * i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "adapter_model.safetensors", list(info), info, tensors(i))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        total += (folder / "adapter_model.safetensors").stat().st_size
    return total


def first_checkpoints(root: Path, n: int) -> Path:
    """A folder with links to the first ``n`` checkpoints of ``root``."""
    sub = root.parent / f"{root.name}-first{n}"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir()
    for folder in sorted(root.iterdir(), key=lambda p: int(p.name.split("-")[1]))[:n]:
        (sub / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return sub


# ----------------------------------------------------------------------------------------------- measurements

def read_floor(root: Path) -> tuple[float, int]:
    """(seconds, bytes): every byte of every checkpoint's weights read once into memory."""
    buf = bytearray(64 << 20)
    t0, total = time.perf_counter(), 0
    for f in sorted(root.glob("*/adapter_model.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


_CHILD = """
import atexit, sys

def peak():  # the process's real peak resident set, as the kernel kept it
    with open("/proc/self/status") as f:
        sys.stderr.write("\\nVmHWM " + next(line.split()[1] for line in f if line.startswith("VmHWM")) + "\\n")

atexit.register(peak)
sys.argv[0] = "nextrap"  # before the import: the process is set up as the command's (``process.at_import``)
from nextrap.cli import app
app()
"""


def run(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(seconds, the process's peak RSS in bytes, stdout) of one nextrap command in its own process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, env=env, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"nextrap {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    hwm = next(int(line.split()[1]) * 1024 for line in reversed(done.stderr.splitlines()) if line.startswith("VmHWM "))
    return seconds, hwm, done.stdout


def write_floor(src: Path, dst: Path) -> float:
    """Seconds to write ``src``'s bytes (read beforehand) to ``dst``, as extend writes its output."""
    data = src.read_bytes()
    t0 = time.perf_counter()
    with open(dst, "wb") as f:
        f.write(data)
    seconds = time.perf_counter() - t0
    dst.unlink()
    return seconds


def startup(env: dict[str, str]) -> float:
    """Seconds for a process to start and import what extend runs (the interpreter and torch): part of extend's
    time that no change to its writing can remove."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import nextrap.api.extend"], check=True, env=env)
    return time.perf_counter() - t0


def dense_reference(root: Path, fit: Path, ckpts: int, layers: int) -> dict[str, float]:
    """Seconds per module of shape, merged and dense-SVD'd, scaled to the reference's count; and the streamed
    features' agreement with those dense samples (the last checkpoint's global delta of layer 0)."""
    last = root / f"checkpoint-{10 * (ckpts - 1)}" / "adapter_model.safetensors"
    feats = Features.load(fit / "trajectory.safetensors")
    config = json.loads((last.parent / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    per_shape, worst_sigma, worst_cos = {}, 0.0, 1.0
    deltas = ckpts + ckpts + (ckpts - HORIZON)  # global, local, target deltas of every module
    with safe_open(str(last), framework="pt") as f:
        for name, m, n in SHAPES:
            if (m, n) in per_shape:
                continue
            key = f"{PREFIX}.0.{name}"
            b, a = f.get_tensor(f"{key}.lora_B.weight").float(), f.get_tensor(f"{key}.lora_A.weight").float()
            t0 = time.perf_counter()
            delta = scale * b @ a  # W_c - W_0 merged (the base is not needed for the difference)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            per_shape[(m, n)] = time.perf_counter() - t0
            sigma = feats.get(key, "global", "sigma")[ckpts - 1]
            worst_sigma = max(worst_sigma, abs(float(sigma) - float(s[0])) / float(s[0]))
            worst_cos = min(worst_cos, abs(float(feats.get(key, "global", "u")[ckpts - 1] @ u[:, 0])),
                            abs(float(feats.get(key, "global", "v")[ckpts - 1] @ vh[0])))
            del delta, u, s, vh
    seconds = layers * deltas * sum(per_shape[(m, n)] for _, m, n in SHAPES)
    return {"seconds": seconds, "sigma_rel_error": worst_sigma, "min_cos": worst_cos}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder for the generated trajectories (not inside a git tree)")
    ap.add_argument("--layers", type=int, nargs="+", default=[28])
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[16], help="fit the first n checkpoints (n >= 11 for a backtest)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured processes")
    ap.add_argument("--device", default="cpu", help="fit's --device (cuda: benchmarks/gpu_check.sh)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["backtest", "no-backtest", "extend", "dense"])
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--reuse", action="store_true", help="fit the trajectory a --keep run left in --data (same layers, rank "
                    "and dtype, at least max(--checkpoints) checkpoints) instead of generating one; it is kept")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(src)
    torch.set_num_threads(args.threads)
    rows = []
    for layers in args.layers:
        root = args.data / f"lora-{layers}l-r{args.rank}-{args.dtype}"
        kept = [f.stat().st_size for f in root.glob("checkpoint-*/adapter_model.safetensors")] if args.reuse else []
        if len(kept) >= max(args.checkpoints):
            total, on_disk = len(kept), sum(kept)
            print(f"reusing {root}: {total} checkpoints, {gb(on_disk)}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            total, on_disk = max(args.checkpoints), generate(root, layers, max(args.checkpoints), args.rank, dtype)
            print(f"generated {layers} layers x {total} checkpoints: {gb(on_disk)} in {time.perf_counter() - t0:.0f} s", flush=True)
        for ckpts in args.checkpoints:
            ckpt_root = root if ckpts == total else first_checkpoints(root, ckpts)
            fit = args.data / f"fit-{layers}l-{ckpts}c"
            row = {"layers": layers, "checkpoints": ckpts, "bytes": on_disk * ckpts // total,
                   "load": os.getloadavg()[0]}  # the machine is shared: how busy it was when this row started
            row["read_cold_s"], _ = read_floor(ckpt_root)
            row["read_s"] = min(row["read_cold_s"], read_floor(ckpt_root)[0])
            common = [str(ckpt_root), "--out", str(fit), "--methods", METHODS, "--max-memory", args.max_memory,
                      "--horizon", str(HORIZON), "--device", args.device, "--overwrite", "--json"]
            if "no-backtest" not in args.skip:
                row["fit_nobt_s"], row["fit_nobt_rss"], _ = run(["fit", *common, "--no-backtest"], env)
            if "backtest" not in args.skip and ckpts >= 2 * HORIZON + 2:  # fewer: fit skips its backtest (step 0 is the base)
                row["fit_s"], row["fit_rss"], out = run(["fit", *common], env)
                row["seconds"] = json.loads(out)["seconds"]
            manifest = json.loads((fit / "manifest.json").read_text())
            row["accounted"] = manifest["streaming"]["peak_bytes"]
            if "extend" not in args.skip:
                jumped = args.data / f"jumped-{layers}l-{ckpts}c"
                row["extend_s"], row["extend_rss"], _ = run(["extend", "--fit", str(fit), "--method", "next", "--alpha", "1.5",
                                                             "--out", str(jumped), "--overwrite", "--json"], env)
                row["write_s"] = write_floor(jumped / "adapter_model.safetensors", args.data / "write-floor.bin")
                row["startup_s"] = startup(env)
                row["extend_bytes"] = (jumped / "adapter_model.safetensors").stat().st_size
                shutil.rmtree(jumped)
            if "dense" not in args.skip:
                row["dense"] = dense_reference(ckpt_root, fit, ckpts, layers)
            shutil.rmtree(fit)
            if ckpt_root != root:
                shutil.rmtree(ckpt_root)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not (args.keep or args.reuse):
            shutil.rmtree(root)
    print_table(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nrank {args.rank}, {args.dtype}, --max-memory {args.max_memory}, --device {args.device}, {args.threads} thread(s), horizon {HORIZON}, "
          f"methods {METHODS}; load: the 1-minute load average as the row started (2 cores, shared)")
    print("| layers | checkpoints | on disk | load | read floor (cold) | fit (backtest) | x floor | peak RSS | fit --no-backtest | "
          "x floor | peak RSS | accounted | extend | write | x write | start-up | x write after start-up | extend RSS | "
          "dense reference (est.) | x fit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = r["read_s"]
        cells = [r["layers"], r["checkpoints"], gb(r["bytes"]), f"{r['load']:.1f}",
                 f"{floor:.1f} s ({r.get('read_cold_s', floor):.1f} s)"]
        for k in ("fit", "fit_nobt"):
            cells += ([f"{r[k + '_s']:.1f} s", f"{r[k + '_s'] / floor:.1f}", gb(r[k + '_rss'])] if k + "_s" in r else ["-"] * 3)
        cells.append(gb(r["accounted"]))
        cells += ([f"{r['extend_s']:.1f} s", f"{r['write_s']:.2f} s", f"{r['extend_s'] / r['write_s']:.1f}",
                   f"{r['startup_s']:.1f} s", f"{(r['extend_s'] - r['startup_s']) / r['write_s']:.1f}", gb(r["extend_rss"])]
                  if "extend_s" in r else ["-"] * 6)
        if "dense" in r:
            fit_s = r.get("fit_s", r.get("fit_nobt_s"))
            cells += [f"{r['dense']['seconds'] / 3600:.1f} h", f"{r['dense']['seconds'] / fit_s:.0f}" if fit_s else "-"]
        else:
            cells += ["-", "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    dense = [r["dense"] for r in rows if "dense" in r]
    if dense:
        print(f"\nstreamed features vs the dense samples: sigma relative error <= {max(d['sigma_rel_error'] for d in dense):.1e}, "
              f"|cos| of u and v >= {min(d['min_cos'] for d in dense):.6f}")


if __name__ == "__main__":
    main()
