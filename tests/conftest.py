"""Shared fixtures: the checked-in tiny model and LoRA trajectory, copied so tests can never modify them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

# The tests' tensors are tiny: one thread avoids OpenMP spin-wait stalls (measured 250x slower SVDs on this
# 2-core machine when another process holds a core) and keeps timings stable on shared CI machines.
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE = FIXTURES / "tiny-llama"
TRAJECTORY = FIXTURES / "lora-trajectory"
FAST_EPOCHS = 30  # the predictor's training is exercised, not converged: tests check plumbing and math


def tree_digest(folder: Path) -> str:
    """One hash of every file's path and bytes under ``folder``: proves inputs were not modified."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder's safetensors (one file or shards), as stored."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def trajectory(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpts"
    shutil.copytree(TRAJECTORY, dst)
    return dst


@pytest.fixture(scope="session")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fit folder shared by the extend tests (fitting is the slow part)."""
    import nextrap

    root = tmp_path_factory.mktemp("fitted")
    shutil.copytree(TRAJECTORY, root / "ckpts")
    nextrap.fit(root / "ckpts", out=root / "fit", epochs=FAST_EPOCHS)
    return root / "fit"


def write_adapter(folder: Path, tensors: dict, config: dict) -> Path:
    """A minimal PEFT adapter folder (what save_pretrained writes), for layout and validation tests."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def lora_tensors(seed: int, modules: dict[str, tuple[int, int, int]]) -> dict:
    """Random LoRA factors: {module: (out, in, r)} -> {module.lora_A.weight, module.lora_B.weight}."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n, r) in modules.items():
        out[f"{name}.lora_A.weight"] = torch.randn(r, n, generator=g)
        out[f"{name}.lora_B.weight"] = torch.randn(m, r, generator=g)
    return out


LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "k"], "fan_in_fan_out": False,
               "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
TWO_MODULES = {"base_model.model.layers.0.q": (6, 5, 4), "base_model.model.layers.0.k": (3, 5, 4)}


def save_drifting_run(model, folder: Path, steps: range, scale: float, noise: float = 0.0, seed: int = 0,
                      name: str = "step_{}") -> Path:
    """Save a PEFT model's adapter at ``steps`` with every lora_B moving along a fixed random direction,
    sublinearly in time (plus optional noise): a small real-PEFT trajectory for layout tests."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    drift = {id(m): torch.randn(m.lora_B["default"].weight.shape, generator=g) * scale for m in layers}
    for step in steps:
        with torch.no_grad():
            for m in layers:
                b = drift[id(m)] * (step / steps[-1]) ** 0.75
                m.lora_B["default"].weight.copy_(b + noise * torch.randn(b.shape, generator=g))
        model.save_pretrained(folder / name.format(step))
    return folder


def dense_deltas(traj, row: int) -> dict:
    """W_row - W_0 of every LoRA module in float64, straight from the factors."""
    out = {}
    for m in traj.modules:
        b, a = traj.factors(row, [m.name])
        out[m.name] = m.scale * b[0] @ a[0]
    return out


# The start of a script that measures a process's real peak (tests of the --max-memory budget): status(key) reads
# /proc/self/status in bytes; the script then warms up, resets VmHWM (clear_refs 5) and measures.
REAL_PEAK_PREAMBLE = """
import json, shutil, sys, torch
torch.set_num_threads(1)
import nextrap

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
"""


def run_peak_script(script: str, args: list[str]) -> dict:
    """Run a REAL_PEAK_PREAMBLE script in its own one-thread process; its last stdout line, as JSON."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
