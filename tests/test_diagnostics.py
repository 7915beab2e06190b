import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LORA_CONFIG, TRAJECTORY, TWO_MODULES, lora_tensors, tree_digest, write_adapter
from nextrap.cli import app
from nextrap.api.diagnostics import (default_fit_checkpoints, diagnose, line_fit_r2, masked_medians, module_layer,
                                 module_linearity, module_type, summarize_r2)
from nextrap.core.errors import NextrapError

runner = CliRunner()


# ------------------------------------------------------------------ the math, against a direct numpy computation

def _np_r2(x_fit, y_fit, x_eval, y_eval):
    """Out-of-sample R^2 of per-coordinate np.polyfit lines, pooled over coordinates and evaluated rows."""
    y_fit, y_eval = np.asarray(y_fit, float).reshape(len(x_fit), -1), np.asarray(y_eval, float).reshape(len(x_eval), -1)
    pred = np.stack([np.polyval(np.polyfit(x_fit, y_fit[:, j], 1), x_eval) for j in range(y_fit.shape[1])], 1)
    return 1 - ((y_eval - pred) ** 2).sum() / ((y_eval - y_eval.mean(0)) ** 2).sum()


def test_line_fit_r2_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    x = np.array([10., 20, 30, 40, 50, 60, 70, 80, 90])
    for d in (1, 7):
        y = rng.normal(size=(9, d)) + np.outer(np.sqrt(x), rng.normal(size=d))
        got = line_fit_r2(torch.tensor(x[:6]), torch.tensor(y[:6]), torch.tensor(x[6:]), torch.tensor(y[6:]))
        assert got == pytest.approx(_np_r2(x[:6], y[:6], x[6:], y[6:]), rel=1e-10)
    y1 = rng.normal(size=9)  # 1-D values are one coordinate
    got = line_fit_r2(torch.tensor(x[:5]), torch.tensor(y1[:5]), torch.tensor(x[5:]), torch.tensor(y1[5:]))
    assert got == pytest.approx(_np_r2(x[:5], y1[:5], x[5:], y1[5:]), rel=1e-10)


def test_line_fit_r2_exact_line_and_undefined_cases():
    x = torch.arange(8, dtype=torch.float64) * 10
    y = torch.stack([3 * x + 1, -2 * x + 5], 1)
    assert line_fit_r2(x[:5], y[:5], x[5:], y[5:]) == pytest.approx(1.0)
    assert line_fit_r2(x[:1], y[:1], x[5:], y[5:]) is None  # one fit point: no line
    assert line_fit_r2(x[:5], y[:5], x[5:6], y[5:6]) is None  # one evaluated row: no spread
    assert line_fit_r2(x[:5], y[:5], x[:0], y[:0]) is None  # nothing to evaluate
    const = torch.ones(8, 3)
    assert line_fit_r2(x[:5], const[:5], x[5:], const[5:]) is None  # constant values: SS_tot = 0
    same_x = torch.full((4,), 7.0, dtype=torch.float64)
    assert line_fit_r2(same_x, y[:4], x[5:], y[5:]) is None


def test_masked_medians_match_numpy_and_skip_empty_columns():
    rng = np.random.default_rng(1)
    values = rng.random((6, 5))
    keep = rng.random((6, 5)) > 0.3
    keep[:, 0] = False  # a column with nothing kept (e.g. step 0: every delta is zero)
    keep[:, 1] = True
    keep[:3, 2], keep[3:, 2] = True, False  # odd count
    got = masked_medians(torch.tensor(values), torch.tensor(keep))
    assert got[0] is None
    for t in range(1, 5):
        assert got[t] == pytest.approx(float(np.median(values[keep[:, t], t]))) if keep[:, t].any() else got[t] is None


def test_summarize_r2_counts_undefined_and_below_threshold():
    s = summarize_r2([0.9, -1.0, None, 0.2, 0.7])
    assert s == {"n": 5, "n_defined": 4, "median": pytest.approx(float(np.median([0.9, -1.0, 0.2, 0.7]))), "frac_below": 0.5}
    assert summarize_r2([None, None]) == {"n": 2, "n_defined": 0, "median": None, "frac_below": None}


def test_module_linearity_skips_zero_rows_and_scales_u_by_sigma():
    rng = np.random.default_rng(2)
    steps = np.arange(9) * 10.0
    sigma = np.r_[0.0, np.sqrt(steps[1:])]
    u, v = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    u[0], v[0] = 0, 0  # what a zero delta's features look like
    got = module_linearity(torch.tensor(steps), torch.tensor(sigma), torch.tensor(u), torch.tensor(v), n_fit=6)
    fit, ev = slice(1, 6), slice(6, 9)  # row 0 is dropped from the fit
    assert got["sigma"] == pytest.approx(_np_r2(steps[fit], sigma[fit], steps[ev], sigma[ev]))
    su = sigma[:, None] * u
    assert got["u"] == pytest.approx(_np_r2(steps[fit], su[fit], steps[ev], su[ev]))
    assert got["v"] == pytest.approx(_np_r2(steps[fit], v[fit], steps[ev], v[ev]))
    assert all(math.isfinite(x) for x in got.values())
    zero = module_linearity(torch.tensor(steps), torch.zeros(9), torch.zeros(9, 4), torch.zeros(9, 3), n_fit=6)
    assert zero == {"sigma": None, "u": None, "v": None}


def test_names_types_layers_and_default_split():
    assert module_type("base_model.model.model.layers.12.self_attn.q_proj") == "q_proj"
    assert module_layer("base_model.model.model.layers.12.self_attn.q_proj") == 12
    assert module_layer("base_model.model.transformer.h.3.attn.c_attn") == 3
    assert module_layer("base_model.model.lm_head") is None
    assert default_fit_checkpoints(15) == 10 and default_fit_checkpoints(17) == 11 and default_fit_checkpoints(3) == 2


# ------------------------------------------------------------------ diagnose() on a trajectory with known answers

MODS = {f"base_model.model.model.layers.{l}.self_attn.{t}": (6 if t == "q_proj" else 3, 5, 2)
        for l in (0, 1) for t in ("q_proj", "k_proj")}
CONFIG = {**LORA_CONFIG, "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"]}  # scale s = 2
STEPS = [0, 10, 20, 30, 40, 50, 60, 70, 80]
LINE = "base_model.model.model.layers.0.self_attn.q_proj"  # B_t = t B1 with A fixed: a straight line in W


def _factors(name: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(zlib.crc32(name.encode()))
    m, n, r = MODS[name]
    a0, a1, b1, b2 = g.normal(size=(r, n)), g.normal(size=(r, n)), g.normal(size=(m, r)), g.normal(size=(m, r))
    t = step / 80
    if name == LINE:
        return t * b1, a0
    return t * b1 + 3 * t * t * b2, a0 + 2 * t * a1  # curved: the direction turns


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("known")
    for s in STEPS:
        tensors = {}
        for name in MODS:
            b, a = _factors(name, s)
            tensors[f"{name}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32)
            tensors[f"{name}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32)
        write_adapter(root / f"step_{s}", tensors, CONFIG)
    return root


def _np_reference(name: str, n_fit: int):
    """Energies and R^2 of one module straight from dense numpy SVDs of W_t - W_0 = s B_t A_t."""
    x = np.array(STEPS, float)
    sig, us, vs, energy = [], [], [], []
    prev = None
    for s in STEPS:
        b, a = _factors(name, s)
        b, a = b.astype(np.float32).astype(float), a.astype(np.float32).astype(float)
        uu, ss, vh = np.linalg.svd(2.0 * b @ a)
        u, v = uu[:, 0], vh[0]
        if ss[0] < 1e-12:
            sig.append(0.0), us.append(np.zeros_like(u)), vs.append(np.zeros_like(v)), energy.append(None)
            continue
        if prev is not None and u @ prev[0] + v @ prev[1] < 0:  # the same sign convention along the trajectory
            u, v = -u, -v
        prev = (u, v)
        sig.append(ss[0]), us.append(u), vs.append(v), energy.append(ss[0] / ss.sum())
    sig, us, vs = np.array(sig), np.array(us), np.array(vs)
    keep = sig > 0
    fit = keep & (np.arange(len(STEPS)) < n_fit)
    ev = keep & ~(np.arange(len(STEPS)) < n_fit)
    r2 = {p: _np_r2(x[fit], y[fit], x[ev], y[ev]) for p, y in
          (("sigma", sig), ("u", sig[:, None] * us), ("v", vs))}
    return energy, r2


def test_diagnose_matches_dense_numpy(known):
    before = tree_digest(known)
    d = diagnose(known)
    assert tree_digest(known) == before
    assert d.steps == STEPS and d.layout == "peft-lora" and d.trainer == "peft" and d.fit_checkpoints == 6
    assert d.dtypes == ["float32"] and d.weights_bytes > 0 and d.size_bytes > d.weights_bytes
    refs = {name: _np_reference(name, 6) for name in MODS}
    by_name = {m.name: m for m in d.modules}
    for name, (energy, r2) in refs.items():
        m = by_name[name]
        assert (m.type, m.layer) == (name.rsplit(".", 1)[1], int(name.split(".layers.")[1].split(".")[0]))
        for p in ("sigma", "u", "v"):
            if name == LINE and p == "v":
                assert m.r2[p] is None  # v never moves on a straight line through W_0: no spread to explain
            else:
                assert m.r2[p] == pytest.approx(r2[p], abs=2e-3), (name, p)
    line = by_name[LINE].r2
    assert line["sigma"] == pytest.approx(1.0, abs=1e-4) and line["u"] == pytest.approx(1.0, abs=1e-4)
    assert by_name["base_model.model.model.layers.1.self_attn.k_proj"].r2["v"] < 0.5
    # energy: per step, median over the modules of a type / a layer; step 0 (all B = 0) is None, not NaN
    for t in ("q_proj", "k_proj"):
        names = [n for n in MODS if n.endswith(t)]
        assert d.energy_by_type[t][0] is None
        for i in range(1, len(STEPS)):
            want = float(np.median([refs[n][0][i] for n in names]))
            assert d.energy_by_type[t][i] == pytest.approx(want, abs=1e-5)
    for layer in (0, 1):
        names = [n for n in MODS if f".layers.{layer}." in n]
        assert d.energy_by_layer[layer][4] == pytest.approx(float(np.median([refs[n][0][4] for n in names])), abs=1e-5)
    out = d.to_json()
    json.dumps(out, allow_nan=False)  # no NaN anywhere
    assert out["energy"]["overall"][0] is None
    assert out["linearity"]["fit_steps"] == STEPS[:6] and out["linearity"]["predicted_steps"] == STEPS[6:]
    assert [r["type"] for r in out["linearity"]["by_type"]] == ["k_proj", "q_proj"]
    assert [r["layer"] for r in out["linearity"]["by_layer"]] == [0, 1]
    q = next(r for r in out["linearity"]["by_type"] if r["type"] == "q_proj")
    assert q["modules"] == 2 and q["v"]["n_defined"] == 1


def test_fit_checkpoints_option(known):
    d = diagnose(known, fit_checkpoints=4)
    assert d.fit_steps == STEPS[:4] and d.predicted_steps == STEPS[4:]
    for bad in (1, 9, 20):
        with pytest.raises(NextrapError, match="--fit-checkpoints"):
            diagnose(known, fit_checkpoints=bad)


@pytest.mark.parametrize("names, trainer", [
    (["checkpoint-10", "checkpoint-20", "checkpoint-30"], "trl"),
    (["global_step_10/actor/lora_adapter", "global_step_20/actor/lora_adapter", "global_step_30/actor/lora_adapter"], "verl"),
    (["global_step10_hf", "global_step20_hf", "global_step30_hf"], "openrlhf"),
    (["step_10", "step_20", "step_30"], "peft"),
])
def test_trainer_layout_from_folder_names(tmp_path, names, trainer):
    for i, name in enumerate(names):
        write_adapter(tmp_path / name, lora_tensors(i, TWO_MODULES), LORA_CONFIG)
    d = diagnose(tmp_path)
    assert d.trainer == trainer and d.layout == "peft-lora" and d.steps == [10, 20, 30]
    assert d.modules[0].layer == 0 and {m.type for m in d.modules} == {"q", "k"}


def test_dtypes_are_read_from_headers(tmp_path):
    for i in range(3):
        t = {k: v.to(torch.bfloat16) for k, v in lora_tensors(i, TWO_MODULES).items()}
        write_adapter(tmp_path / f"step_{i}", t, LORA_CONFIG)
    assert diagnose(tmp_path).dtypes == ["bfloat16"]
    (tmp_path / "step_2" / "adapter_model.safetensors").unlink()  # a .bin adapter, read with weights_only
    torch.save({k: v.to(torch.float16) for k, v in lora_tensors(2, TWO_MODULES).items()}, tmp_path / "step_2" / "adapter_model.bin")
    assert diagnose(tmp_path).dtypes == ["bfloat16", "float16"]


def test_fixture_trajectory_has_no_nan_and_skips_step_0():
    d = diagnose(TRAJECTORY)
    assert d.steps[0] == 0 and len(d.steps) == 17 and len(d.modules) == 14 and d.fit_checkpoints == 11
    assert d.energy_overall[0] is None and all(e is not None and 0 < e <= 1 for e in d.energy_overall[1:])
    assert all(v is not None and math.isfinite(v) for m in d.modules for v in m.r2.values())
    json.dumps(d.to_json(), allow_nan=False)


# ------------------------------------------------------------------ CLI

def test_cli_inspect_json(known):
    res = runner.invoke(app, ["inspect", str(known), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["layout"] == "peft-lora" and out["steps"] == STEPS
    assert {"modules", "energy", "linearity", "dtypes", "size_bytes", "trainer"} <= set(out)
    assert out["modules"]["count"] == 4 and out["modules"]["types"] == {"k_proj": 2, "q_proj": 2}
    assert len(out["linearity"]["modules"]) == 4


def test_cli_inspect_tables_and_plot(known, tmp_path):
    png = tmp_path / "diag.png"
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(png)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("peft-lora", "rank-1 energy", "linearity", "q_proj", "k_proj", "layer", "R²"):
        assert text in res.output, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect_errors_are_one_line(known, tmp_path, monkeypatch):
    res = runner.invoke(app, ["inspect", str(known), "--fit-checkpoints", "1"])
    assert res.exit_code == 1 and "--fit-checkpoints" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "not a folder" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(tmp_path / "p.png")])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "matplotlib" in lines[0]
    assert not (tmp_path / "p.png").exists()


def test_inspect_reads_a_full_parameter_trajectory_with_its_base(tmp_path):
    """`nextrap inspect FULL --base BASE --json` gives layout, steps and rank-1 energies from a dense SVD."""
    import statistics

    from conftest import BASE
    from test_fullparam import STEPS, dense, make_run

    run = make_run(tmp_path / "ckpts")
    res = runner.invoke(app, ["inspect", str(run), "--base", str(BASE), "--max-memory", "64MB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["layout"] == "hf-full" and out["trainer"] == "hf" and out["steps"] == STEPS
    assert {"float32", "bfloat16"} <= set(out["dtypes"])
    names = [m["name"] for m in out["modules"]["list"]]
    assert "model.layers.0.mlp.up_proj.weight" in names and "model.norm.weight" not in names  # vectors have no SVD
    row = len(STEPS) - 1
    q = [m for m in names if m.endswith("q_proj.weight")]
    assert out["modules"]["types"]["q_proj"] == len(q) > 0
    energies = []
    for name in q:
        s = torch.linalg.svdvals(dense(run, name, row) - dense(run, name, -1))
        energies.append(float(s[0] / s.sum()))
    by_type = {e["type"]: e["median"] for e in out["energy"]["by_type"]}
    assert abs(by_type["q_proj"][row] - statistics.median(energies)) < 1e-4
    assert out["energy"]["overall"][0] is None  # step 0 is the base itself: no delta, no energy


def test_cli_inspect_prints_the_plot_file_it_wrote(known, tmp_path):
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(tmp_path / "energyplot")], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert f"plot written to {tmp_path / 'energyplot.png'}" in res.stdout and (tmp_path / "energyplot.png").is_file()
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(tmp_path / "energyplot.png"), "--json"])
    assert res.exit_code == 1 and "already exists" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(tmp_path / "energyplot.png"), "--overwrite", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(known), "--plot", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder" in res.stderr and not (tmp_path.parent / f"{tmp_path.name}.png").exists()
