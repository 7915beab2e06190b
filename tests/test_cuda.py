"""The GPU path against the CPU result: the same fit with ``device="cuda"`` and ``device="cpu"``, on a LoRA and a
full-parameter trajectory, must give the same features, backtest and jump. ``benchmarks/gpu_check.sh`` runs these
on a machine with CUDA (``pytest -m cuda``); without a CUDA device they cannot run and are skipped, except that
``NEXTRAP_TEST_DEVICE=cpu`` runs them CPU against CPU, which checks the tests themselves (the script's CPU fallback)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nextrap
from conftest import BASE, FAST_EPOCHS, TRAJECTORY, model_state
from test_fullparam import make_run

DEVICE = os.environ.get("NEXTRAP_TEST_DEVICE", "cuda")
RUNS = {"reference": "cpu", "device": DEVICE}  # label -> torch device
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device")]

METHODS = ("linear", "expo", "relex", "next", "next-paper")


def _inputs(kind: str, tmp: Path) -> tuple[Path, Path | None]:
    if kind == "lora":
        shutil.copytree(TRAJECTORY, tmp / "ckpts")
        return tmp / "ckpts", None
    return make_run(tmp / "ckpts"), BASE


def _assert_same_features(cpu: dict[str, torch.Tensor], gpu: dict[str, torch.Tensor]) -> None:
    assert cpu.keys() == gpu.keys()
    for key, a in cpu.items():
        b, known = gpu[key].double(), ~torch.isnan(a)  # target rows without a future are NaN in both
        a = a.double()
        assert torch.equal(known, ~torch.isnan(b)), key
        if key.endswith((":sigma", ":energy", ":vec")):
            torch.testing.assert_close(b[known], a[known], rtol=1e-4, atol=1e-7, msg=key)
        elif key.endswith((":u", ":v")):  # singular vectors up to sign, row by row
            rows = known.all(-1) & (a.norm(dim=-1) > 0)
            cos = (a[rows] * b[rows]).sum(-1).abs() / (a[rows].norm(dim=-1) * b[rows].norm(dim=-1))
            assert bool((cos >= 0.999).all()), (key, cos.min())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_fit_and_its_jump_on_cuda_match_the_cpu(kind, tmp_path):
    ckpts, base = _inputs(kind, tmp_path)
    fits = {}
    for label, device in RUNS.items():
        fits[label] = tmp_path / f"fit-{label}"
        nextrap.fit(ckpts, out=fits[label], horizon=2, epochs=FAST_EPOCHS, device=device, methods=METHODS, base=base,
                    max_memory="64MB")
    _assert_same_features(load_file(str(fits["reference"] / "trajectory.safetensors")),
                          load_file(str(fits["device"] / "trajectory.safetensors")))
    backtest = {d: {b["method"]: b for b in json.loads((f / "manifest.json").read_text())["summary"]["backtest"]}
                for d, f in fits.items()}
    assert backtest["reference"].keys() == backtest["device"].keys() and backtest["reference"]
    for method in ("linear", "expo", "relex", "next"):  # the predictor's backtest differs by its own float noise
        for field in ("error", "cosine", "best_error"):
            assert backtest["device"][method][field] == pytest.approx(backtest["reference"][method][field], rel=1e-4, abs=1e-6)
    fmt = "adapter" if kind == "lora" else "merged"
    for method in ("linear", "next"):
        written = {}
        for label, fit in fits.items():
            out = tmp_path / f"{method}-{label}"
            nextrap.extend(fit, [1.5], out, fmt=fmt, method=method)
            written[label] = (load_file(str(out / "adapter_model.safetensors")) if fmt == "adapter" else model_state(out))
        assert written["reference"].keys() == written["device"].keys()
        for key, a in written["reference"].items():
            torch.testing.assert_close(written["device"][key].double(), a.double(), rtol=1e-4, atol=1e-6, msg=key)


def test_max_gpu_memory_bounds_what_the_streamed_passes_hold_on_the_device(tmp_path):
    """--max-gpu-memory: the passes' accounted peak stays within it, and so does what torch allocated on the GPU
    beyond what it held before (plus 16 MB: cuBLAS and cuSOLVER workspaces, which the budget does not govern)."""
    ckpts, _ = _inputs("lora", tmp_path)
    limit = 6_000_000
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    res = nextrap.fit(ckpts, out=tmp_path / "fit", horizon=2, device=DEVICE, methods=("linear", "relex", "next"),
                      max_memory="64MB", max_gpu_memory=str(limit))
    budget = limit if DEVICE.startswith("cuda") else 64_000_000  # on the CPU the device limit does not apply
    assert res.streaming["max_memory_bytes"] == budget and res.streaming["peak_bytes"] <= budget
    if DEVICE.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() - before <= limit + 16_000_000


def test_the_next_paper_predictor_trains_the_same_on_cuda():
    from nextrap.methods.predictor import TrainSettings, predict, train
    from nextrap.trajectories.opening import open_trajectory

    features = open_trajectory(TRAJECTORY).features(2, sign_align=False)
    row = features.n_rows - 1
    out = {}
    for label, device in RUNS.items():
        model = train(features, TrainSettings(epochs=200, device=device))
        out[label] = predict(model, features, row)
    for module, parts in out["reference"].items():
        for part, value in parts.items():
            torch.testing.assert_close(out["device"][module][part], value, rtol=1e-3, atol=1e-5, msg=f"{module} {part}")
