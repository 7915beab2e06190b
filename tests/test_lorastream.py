"""LoRA trajectories streamed under --max-memory: the outputs are those of the code before streaming, each
checkpoint is read once per unit, a module that cannot fit is named before anything is read, the writers keep
the budget, and the process's real peak stays within it."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nextrap
from conftest import LORA_CONFIG, REAL_PEAK_PREAMBLE, TRAJECTORY, dense_deltas, run_peak_script, write_adapter
from nextrap.io.checkpoints import LoraTrajectory, load_trajectory, shape_groups
from nextrap.core.errors import NextrapError
from nextrap.engine.lorastream import LoraMove, feature_bytes, preflight, projections
from nextrap.core.lowrank import top1_dense
from nextrap.core.features import Features
from nextrap.engine.lorafeatures import compute_features, pair_factors, stream_lora_features

H = 5
METHODS = ("next", "linear", "expo", "relex")  # next-paper trains on raw SVD signs, which are the SVD's to choose

# What the code at commit fbdbd14 (before streaming: all checkpoints of a shape group held in float64) wrote for
# `nextrap.fit(fixtures/lora-trajectory, methods=METHODS, backtest_folds=3)` and `extend(..., [1.5], method="next")`.
BEFORE = {
    "backtest": {  # (t, c, j) pooled over the 3 folds
        "next": (0.03444394080937736, 0.015275509776270336, 0.03113902217581965),
        "linear": (0.03444394080937736, 0.015275509776270336, 0.03113902217581965),
        "expo": (0.03444394080937736, 0.01893329863947639, 0.12238382016178201),
        "relex": (0.03444394080937736, 0.006682488004428347, 0.018086642185577623),
        "oracle-rank1": (0.03444394080937736, 0.018801028596240978, 0.018801028596240978),
    },
    "next": {"weights_u": [1.2217542890029987, -0.7214099174334331, 0.16126834125136538],
             "weights_v": [0.533868279848426, 0.4059963822701593, 0.04623898612179078],
             "log_ratio": -0.06663952203920137, "rho": 0.6490150009709177},
    "next_sigma_sum": 0.27340346947312355,  # sum of prediction.safetensors' sigmas of the next jump
}


@pytest.fixture(scope="module")
def traj() -> LoraTrajectory:
    return load_trajectory(TRAJECTORY)


def test_a_fit_gives_what_the_code_before_streaming_gave(tmp_path):
    res = nextrap.fit(TRAJECTORY, out=tmp_path / "fit", methods=METHODS, backtest_folds=3, max_memory="2MB")
    for b in res.backtest:
        t, c, j = BEFORE["backtest"][b.method]
        assert b.terms.t == pytest.approx(t, rel=1e-9), b.method  # the true move: checkpoints only
        # The moves of the oracle (the stored sigmas squared) and of relex (its direction is the stored global u, v)
        # are made of stored float32 features: the feature pass computes them in float32 (lorastream), which can
        # move a stored u, v by one float32 ulp (~1e-7 relative; measured 1.0e-7 on relex's c and j). Every other
        # method's move is made of checkpoints and float64 products: to 1e-9.
        rel = 1e-6 if b.method in ("oracle-rank1", "relex") else 1e-9
        assert (b.terms.c, b.terms.j) == pytest.approx((c, j), rel=rel), b.method
    model = json.loads((tmp_path / "fit" / "next.json").read_text())
    for key, want in BEFORE["next"].items():  # fitted on the stored float32 features
        assert model[key] == pytest.approx(want, rel=1e-6), key
    nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "next", method="next")
    pred = load_file(str(tmp_path / "next" / "prediction.safetensors"))
    assert sum(float(v) for k, v in pred.items() if k.endswith(":sigma")) == pytest.approx(BEFORE["next_sigma_sum"], rel=1e-6)


def test_every_stored_feature_matches_a_dense_float64_reference(traj, tmp_path):
    """Every key of trajectory.safetensors (sigma, u, v of each kind, the energy) against merged deltas' SVDs."""
    nextrap.fit(TRAJECTORY, out=tmp_path / "fit", methods=("linear",), run_backtest=False, max_memory="2MB")
    feats = Features.load(tmp_path / "fit" / "trajectory.safetensors")
    n = len(traj.steps)
    dense = [dense_deltas(traj, i) for i in range(n)]
    assert set(feats.tensors) == {f"{m.name}:{k}:{p}" for m in traj.modules for k in ("global", "local", "target")
                                  for p in ("sigma", "u", "v")} | {f"{m.name}:global:energy" for m in traj.modules}
    for m in traj.modules:
        g = torch.stack([d[m.name] for d in dense])
        for kind, x in {"global": g, "local": torch.cat([g[:1], g[1:] - g[:-1]]), "target": g[H:] - g[:-H]}.items():
            ref, rows = top1_dense(x), x.shape[0]
            sigma = feats.get(m.name, kind, "sigma")
            assert sigma.dtype == torch.float32 and torch.isnan(sigma[rows:]).all() and torch.isfinite(sigma[:rows]).all()
            moved = ref.sigma > 0
            assert (sigma[:rows][~moved] == 0).all()
            assert ((sigma[:rows].double() - ref.sigma).abs()[moved] / ref.sigma[moved]).max() <= 1e-5
            for part, want in (("u", ref.u), ("v", ref.v)):
                cos = (feats.get(m.name, kind, part)[:rows].double() * want).sum(-1).abs()
                assert cos[moved].min() >= 0.9999
            if kind == "global":
                assert torch.allclose(feats.get(m.name, "global", "energy").double(), ref.energy, rtol=1e-5, atol=0)


def test_a_local_delta_a_thousand_times_smaller_than_the_global_one_keeps_its_sigma(tmp_path):
    """The feature pass computes in float32 (lorastream): a late step's local delta L = s (B_i A_i - B_o A_o), a
    thousandth of the global delta, must keep sigma to 1e-4 of a float64 dense SVD. Written as checkpoint pairs
    [B_i, -B_o], [A_i; A_o], float32 Grams would cancel and lose eps32 (||G|| / ||L||)^2 (~6e-2 here); the
    difference form B_i dA + dB A_o has nothing to cancel."""
    g = torch.Generator().manual_seed(3)
    shapes = {"base_model.model.layers.0.q": (96, 80, 8), "base_model.model.layers.0.k": (48, 80, 8)}
    base = {name: (torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for name, (m, n, r) in shapes.items()}
    for step in range(4):  # the factors are order 1, every step moves them by about 1e-3
        base = {name: (b + 1e-3 * torch.randn(b.shape, generator=g), a + 1e-3 * torch.randn(a.shape, generator=g))
                for name, (b, a) in base.items()}
        tensors = {f"{name}.lora_{x}.weight": t for name, ba in base.items() for x, t in zip("BA", ba)}
        write_adapter(tmp_path / f"step_{step}", tensors, {**LORA_CONFIG, "r": 8, "lora_alpha": 16})
    traj = load_trajectory(tmp_path)
    feats = compute_features(traj, 2)
    dense = [dense_deltas(traj, i) for i in range(4)]
    for m in traj.modules:
        g_ = torch.stack([d[m.name] for d in dense])
        for kind, x in {"local": g_[1:] - g_[:-1], "target": g_[2:] - g_[:-2]}.items():
            ref = top1_dense(x)
            assert (top1_dense(g_[-len(x):]).sigma / ref.sigma).min() >= 500  # the ratio this test is about (500-1000)
            sigma = feats.get(m.name, kind, "sigma")[1:4] if kind == "local" else feats.get(m.name, kind, "sigma")[:2]
            assert ((sigma.double() - ref.sigma).abs() / ref.sigma).max() <= 1e-4, (m.name, kind)


def test_features_do_not_depend_on_how_the_budget_cuts_the_modules(traj):
    whole = compute_features(traj, H, budget=None)
    one_by_one, stats = stream_lora_features(traj, H, budget=feature_bytes(traj) + 400_000, max_batch=None)
    assert stats.batches > len(shape_groups(traj.modules)) and stats.peak <= feature_bytes(traj) + 400_000
    for key, t in whole.tensors.items():
        assert torch.allclose(t, one_by_one.tensors[key], rtol=1e-6, atol=1e-7, equal_nan=True), key


@pytest.fixture
def reads(monkeypatch) -> list[tuple[int, tuple[str, ...]]]:
    """Every ``LoraTrajectory.factors`` call from here on, as (checkpoint row, module names)."""
    seen: list[tuple[int, tuple[str, ...]]] = []
    real = LoraTrajectory.factors

    def spy(self, index, names, dtype=torch.float64, pin=False):
        seen.append((index, tuple(names)))
        return real(self, index, names, dtype, pin)

    monkeypatch.setattr(LoraTrajectory, "factors", spy)
    return seen


def test_each_checkpoint_is_read_once_per_unit_and_only_its_modules(traj, reads):
    _, stats = stream_lora_features(traj, H, budget=feature_bytes(traj) + 1_000_000)
    units = list(dict.fromkeys(names for _, names in reads))
    assert stats.batches == len(units) > 1
    assert sorted(m for u in units for m in u) == sorted(m.name for m in traj.modules)  # every module in one unit
    for unit in units:
        assert [i for i, names in reads if names == unit] == list(range(len(traj.steps)))


def test_the_feature_pass_projects_on_the_fold_starts_and_relex_reads_nothing_more(reads):
    """``project``: the projected rows are read first, then every row once; ``projections`` on those rows'
    stored directions (either joint sign) answers from memory, equal to a pass of its own; anything else streams."""
    traj = load_trajectory(TRAJECTORY)  # a fresh object: nothing projected yet
    n, budget = len(traj.steps), feature_bytes(traj) + 1_000_000
    c = n - 1
    with pytest.raises(ValueError, match="rows 0..16"):
        stream_lora_features(traj, H, budget=budget, project=[n])
    feats, _ = stream_lora_features(traj, H, budget=budget, max_batch=None, project=[c - H, c - H - 1])
    units = list(dict.fromkeys(names for _, names in reads))
    assert len(units) > 1
    for unit in units:
        assert [i for i, names in reads if names == unit] == [c - H - 1, c - H, *range(n)]
    plain, _ = stream_lora_features(load_trajectory(TRAJECTORY), H, budget=budget, max_batch=None)
    for key, t in plain.tensors.items():  # reading rows ahead changes no feature
        torch.testing.assert_close(feats.tensors[key], t, rtol=0, atol=0, equal_nan=True, msg=key)

    def directions(row: int, sign: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m.name: (sign * feats.get(m.name, "global", "u")[row].double(), sign * feats.get(m.name, "global", "v")[row].double())
                for m in traj.modules}

    reads.clear()
    for sign in (1.0, -1.0):
        known = projections(traj, directions(c - H, sign), list(range(c - H + 1)), budget)
        assert reads == []
        fresh = projections(load_trajectory(TRAJECTORY), directions(c - H, sign), list(range(c - H + 1)), budget)
        assert reads and all(torch.equal(known[m], fresh[m]) for m in known)
        reads.clear()
    dense = [dense_deltas(traj, i) for i in range(n)]
    for row, rows in ((c, list(range(c + 1))), (c - H, list(range(c - H + 2)))):  # not projected; past the row
        got = projections(traj, directions(row), rows, budget)
        assert {i for i, _ in reads} == set(rows)
        reads.clear()
        for name, (u, v) in directions(row).items():
            want = torch.stack([u @ dense[i][name] @ v for i in rows])
            assert (got[name] - want).abs().max() <= 1e-6 * want.abs().max(), name


def test_a_fits_relex_backtest_reads_no_checkpoint_beyond_the_feature_pass_and_its_terms(tmp_path, reads):
    res = nextrap.fit(TRAJECTORY, out=tmp_path / "fit", methods=("relex",), horizon=H, max_memory="2MB")
    assert [b.method for b in res.backtest] == ["relex", "oracle-rank1"]
    c = len(res.steps) - 1
    # the fold's start twice in the feature pass (ahead, then in order) and once in the terms' pass (c - h -> c)
    want = {i: 1 + (i == c - H) * 2 + (i == c) for i in range(c + 1)}
    counts = Counter((i, m) for i, names in reads for m in names)
    assert counts == {(i, m): k for i, k in want.items() for m in {m for _, m in counts}}


def test_a_module_that_cannot_fit_is_named_before_anything_is_read(trajectory, tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a factor was read")

    monkeypatch.setattr(LoraTrajectory, "factors", no_reads)
    with pytest.raises(NextrapError, match=r"LoRA module base_model\.\S+ \[\d+x\d+, r 8\] needs .* for the rank-1 features .*"
                                           r"--max-memory budget 0\.3 MB"):
        nextrap.fit(trajectory, out=tmp_path / "fit", max_memory="300KB")
    assert not (tmp_path / "fit").exists()
    traj = load_trajectory(trajectory)
    features = feature_bytes(traj)
    enough_for_features = features + 400_000
    assert enough_for_features < 3 * features  # the later passes hold the features, a fold's copy and an aligned one
    with pytest.raises(NextrapError, match="needs .* for the backtest"):
        preflight(traj, H, enough_for_features)


def test_the_cli_takes_max_memory_for_lora_runs(trajectory, tmp_path):
    from typer.testing import CliRunner

    from nextrap.cli import app

    r = CliRunner().invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--max-memory", "300KB", "--json"])
    assert r.exit_code == 1 and "--max-memory budget 0.3 MB" in r.output and not (tmp_path / "fit").exists()
    r = CliRunner().invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--max-memory", "3MB", "--json",
                                 "--methods", "linear", "--no-backtest"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    assert manifest["streaming"]["max_memory_bytes"] == 3_000_000
    assert 0 < manifest["streaming"]["peak_bytes"] <= 3_000_000


def test_a_lora_move_reads_a_modules_factors_only_when_asked(traj, monkeypatch):
    m = traj.modules[3]
    move = LoraMove(traj, 12, 7)
    b1, a1 = traj.factors(12, [m.name])
    b0, a0 = traj.factors(7, [m.name])
    # the difference form s [B_12, B_12 - B_7] [A_12 - A_7; A_7], whose product is the pair's s (B_12 A_12 - B_7 A_7)
    p = m.scale * torch.cat([b1[0], b1[0] - b0[0]], -1)
    q = torch.cat([(a1[0] - a0[0]).mT, a0[0].mT], -1)
    pp, pq = pair_factors(b1[0], a1[0], b0[0], a0[0], torch.tensor(m.scale, dtype=torch.float64))
    assert torch.allclose(p @ q.mT, pp @ pq.mT, atol=1e-12)
    extra = {m.name: (torch.ones(m.out_features, 1, dtype=torch.float64), torch.ones(m.in_features, 1, dtype=torch.float64))}
    reads = []
    real = LoraTrajectory.factors
    monkeypatch.setattr(LoraTrajectory, "factors", lambda self, i, names, *a: reads.append(i) or real(self, i, names, *a))
    more = move.plus(extra)
    assert reads == [] and len(move) == len(traj.modules) and move.rank(m.name) == 2 * m.rank and more.rank(m.name) == 2 * m.rank + 1
    mp, mq = move[m.name]
    assert torch.equal(mp, p) and torch.equal(mq, q) and reads == [12, 7]
    mp, mq = more[m.name]
    assert torch.equal(mp[:, :-1], p) and torch.equal(mq[:, -1:], extra[m.name][1])
    zero = more.only({traj.modules[0].name})
    assert zero[m.name][0].shape == (m.out_features, 2 * m.rank + 1) and not zero[m.name][0].any()
    expo = LoraMove(traj, 12, None)
    assert torch.allclose(expo[m.name][0] @ expo[m.name][1].mT, dense_deltas(traj, 12)[m.name], atol=1e-12)


def test_extend_keeps_the_fits_budget_and_names_a_module_it_cannot_write(tmp_path):
    nextrap.fit(TRAJECTORY, out=tmp_path / "fit", methods=("linear", "next"), max_memory="2MB")
    small = nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "small", method="linear")
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    manifest["streaming"] = {}  # a fit from before the budget: no limit
    (tmp_path / "fit" / "manifest.json").write_text(json.dumps(manifest))
    free = nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "free", method="linear")
    a, b = load_file(str(small.out / "adapter_model.safetensors")), load_file(str(free.out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    features = sum(t.numel() * t.element_size() for t in Features.load(tmp_path / "fit" / "trajectory.safetensors").tensors.values())
    manifest["streaming"] = {"max_memory_bytes": features + 1000}
    (tmp_path / "fit" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NextrapError, match=r"writing LoRA module base_model\.\S+ needs .* --max-memory"):
        nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "refused", method="linear")
    assert not (tmp_path / "refused").exists()


# --- the process's real peak memory ------------------------------------------------------------------------------

def drifting_lora(root: Path, modules: int, steps: int, out: int, inp: int, rank: int, seed: int = 0) -> int:
    """A LoRA trajectory whose B grows along a turning direction with noise and whose A drifts; returns its bytes."""
    g = torch.Generator().manual_seed(seed)
    a0 = [torch.randn(rank, inp, generator=g) / math.sqrt(inp) for _ in range(modules)]
    dirs = [[torch.randn(out, rank, generator=g) / math.sqrt(out) for _ in range(3)] for _ in range(modules)]
    config = {**LORA_CONFIG, "r": rank, "lora_alpha": 2 * rank}
    for s in range(steps):
        t = s / (steps - 1)
        tensors = {}
        for k in range(modules):
            b1, b2, b3 = dirs[k]
            name = f"base_model.model.layers.{k}.q"
            tensors[f"{name}.lora_B.weight"] = t**0.7 * (math.cos(t) * b1 + math.sin(t) * b2) + 0.2 * t * torch.randn(1, generator=g) * b3
            tensors[f"{name}.lora_A.weight"] = a0[k] + 0.01 * t * torch.randn(rank, inp, generator=g)
        write_adapter(root / f"step_{10 * s}", tensors, config)
    return sum(f.stat().st_size for f in root.rglob("*.safetensors"))


_REAL_PEAK = REAL_PEAK_PREAMBLE + """
ckpts, warm, out, budget, heap = sys.argv[1:6]
import os
os.environ["NEXTRAP_HEAP"] = heap  # "reuse" as the command sets it, "" as a library user's process has it
methods = ("linear", "relex", "next")  # every streamed pass: features, backtest, relex's projections, next's check
# One small fit first: imports and torch's one-time initialisation (LAPACK, OpenMP, allocator arenas) are not what
# the budget governs, and would otherwise dominate a test-sized trajectory.
nextrap.fit(warm, out=out, horizon=1, max_memory=budget, methods=methods)
nextrap.extend(out, [1.0], out + "-x", method="linear")
shutil.rmtree(out)
shutil.rmtree(out + "-x")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
rss0 = status("VmRSS")
res = nextrap.fit(ckpts, out=out, horizon=1, max_memory=budget, methods=methods)
fit_growth = status("VmHWM") - rss0
nextrap.extend(out, [1.0], out + "-x", method="linear")
accounted = json.load(open(out + "/manifest.json"))["streaming"]["peak_bytes"]
print(json.dumps({"growth": max(fit_growth, status("VmHWM") - rss0), "accounted": accounted, "backtest": len(res.backtest)}))
"""
REAL_BUDGET = 40_000_000
REAL_ALLOWANCE = 12_000_000  # as for full-parameter runs: first use of LAPACK workspaces, Python objects, page granularity
# The command's heap mode (``budget.heap_hygiene``) keeps freed pages inside the heap for the unit's next blocks, and
# how many it holds at the peak depends on timing: growth 32-46 MB in 10 runs at this budget (35-43 MB with every
# block mapped). Its promise is this larger margin.
REUSE_ALLOWANCE = 20_000_000


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the real peak")
@pytest.mark.parametrize("heap", ["reuse", ""])
def test_the_process_real_peak_stays_within_the_budget(tmp_path, heap):
    on_disk = drifting_lora(tmp_path / "ckpts", modules=16, steps=12, out=1024, inp=1024, rank=64)
    drifting_lora(tmp_path / "warm", modules=2, steps=4, out=1024, inp=1024, rank=64, seed=1)
    assert on_disk > REAL_BUDGET + REAL_ALLOWANCE
    args = [str(tmp_path / "ckpts"), str(tmp_path / "warm"), str(tmp_path / "fit"), str(REAL_BUDGET), heap]
    measured = run_peak_script(_REAL_PEAK, args)
    assert measured["backtest"] > 0 and measured["accounted"] <= REAL_BUDGET
    assert measured["growth"] <= REAL_BUDGET + (REUSE_ALLOWANCE if heap == "reuse" else REAL_ALLOWANCE), measured
