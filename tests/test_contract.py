"""The ``Trajectory`` contract, written once and run over both implementations: a LoRA run (the checked-in
fixture) and a full-parameter run (tiny Llama checkpoints against their base). Every check compares with a dense
float64 reference built from the checkpoints' own tensors: W_row - W_0 per unit, as an [m, n] matrix."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import BASE, FAST_EPOCHS, TRAJECTORY, model_state
from nextrap.io.checkpoints import load_trajectory, relative_name
from nextrap.api.diagnostics import diagnose
from nextrap.methods import METHODS, JumpContext, fit_models, jump
from nextrap.core.moves import Jump
from nextrap.trajectories.opening import open_trajectory
from nextrap.methods.predictor import TrainSettings
from nextrap.trajectories.interface import Trajectory
from test_fullparam import make_run

H = 2


class Case:
    """One implementation under contract: the trajectory, its folder, and the dense reference."""

    def __init__(self, traj: Trajectory, root: Path, opened_with: Path | None, delta: Callable[[int, str], torch.Tensor],
                 weight_key: Callable[[str], str]):
        self.traj, self.root, self.opened_with = traj, root, opened_with  # opened_with: the --base it is read with
        self.base = BASE  # the model both runs started from: merged writers add to it
        self._delta = delta
        self.weight_key = weight_key  # a unit's weight name in a Hugging Face model folder
        self.matrices = [u for u in traj.units if not u.vector]
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def delta(self, row: int | None, name: str) -> torch.Tensor:
        """W_row - W_0 of unit ``name`` as its [m, n] matrix in float64 (zero for the base, row None or < 0)."""
        unit = next(u for u in self.traj.units if u.name == name)
        if row is None or row < 0:
            return torch.zeros(unit.shape, dtype=torch.float64)
        if (row, name) not in self._cache:
            self._cache[(row, name)] = self._delta(row, name).reshape(unit.shape)
        return self._cache[(row, name)]

    def move(self, j: Jump, name: str) -> torch.Tensor:
        """The dense move of ``j`` for unit ``name``: its checkpoint difference plus its explicit factors."""
        unit = next(u for u in self.traj.units if u.name == name)
        out = torch.zeros(unit.shape, dtype=torch.float64)
        if j.difference is not None and (j.keep is None or name in j.keep):
            row, ref = j.difference
            out += self.delta(row, name) - self.delta(ref, name)
        if name in j.factors:
            p, q = j.factors[name]
            out += (p.double() @ q.double().mT).reshape(unit.shape)
        return out


def _lora_case(_: Path) -> Case:
    traj = open_trajectory(TRAJECTORY)

    def delta(row: int, name: str) -> torch.Tensor:
        b, a = traj.factors(row, [name])
        return traj.module(name).scale * b[0].double() @ a[0].double()

    return Case(traj, TRAJECTORY, None, delta, lambda name: relative_name(name) + ".weight")


def _full_case(tmp: Path) -> Case:
    root = make_run(tmp / "full")
    traj = open_trajectory(root, base=BASE)
    return Case(traj, root, BASE, lambda row, name: traj.tensor(row, name).double() - traj.tensor(-1, name).double(),
                lambda name: name)


@pytest.fixture(scope="module", params=["lora", "full"])
def case(request, tmp_path_factory) -> Case:
    return {"lora": _lora_case, "full": _full_case}[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def features(case):
    return case.traj.features(H, sign_align=True)


def test_the_kind_is_told_from_the_folder(case):
    assert case.traj.kind in ("lora", "full") and len(case.traj.steps) == len(set(case.traj.steps)) > 2 * H
    assert case.traj.folder(0).is_dir() and case.traj.units and set(case.traj.formats) >= {"merged"}


def test_features_match_a_dense_svd(case, features):
    n = len(case.traj.steps)
    assert features.modules == [u.name for u in case.traj.units] and features.steps == case.traj.steps
    for unit in case.matrices:
        g = torch.stack([case.delta(i, unit.name) for i in range(n)])
        deltas = {"global": g, "local": torch.cat([g[:1], g[1:] - g[:-1]]), "target": g[H:] - g[:-H]}
        for kind, x in deltas.items():
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            sigma = features.get(unit.name, kind, "sigma")[:len(x)].double()
            moved = s[:, 0] > 1e-9 * s[:, 0].max()
            assert torch.all((sigma[moved] - s[moved, 0]).abs() <= 1e-4 * s[moved, 0]), (unit.name, kind)
            for part, want in (("u", u[..., 0]), ("v", vh[:, 0])):
                cos = (features.get(unit.name, kind, part)[:len(x)].double() * want).sum(-1).abs()
                assert cos[moved].min() >= 0.999, (unit.name, kind, part)
    for unit in (u for u in case.traj.units if u.vector):  # 1-D parameters: the raw delta
        want = torch.stack([case.delta(i, unit.name)[:, 0] for i in range(n)])
        assert torch.allclose(features.get(unit.name, "global", "vec").double(), want, rtol=1e-5, atol=1e-7)


def _explicit(case: Case, seed: int = 0) -> Jump:
    g = torch.Generator().manual_seed(seed)
    return Jump("explicit", {u.name: (torch.randn(u.shape[0], 2, generator=g, dtype=torch.float64) * 1e-2,
                                      torch.randn(u.shape[1], 2, generator=g, dtype=torch.float64) * 1e-2)
                             for u in case.matrices}, {})


def test_backtest_terms_match_dense_inner_products(case):
    traj, c = case.traj, len(case.traj.steps) - 1
    moves = {"explicit": _explicit(case), "linear": traj.difference(c - H, c - 2 * H, "linear"),
             "expo": traj.difference(c - H, None, "expo")}
    terms, t = traj.terms(moves, c - H, c)
    names = [u.name for u in traj.units]
    true = {n: case.delta(c, n) - case.delta(c - H, n) for n in names}
    want_t = sum(float((x * x).sum()) for x in true.values())
    assert t == pytest.approx(want_t, rel=1e-9)
    for method, j in moves.items():
        dense = {n: case.move(j, n) for n in names}
        want = (want_t, sum(float((true[n] * dense[n]).sum()) for n in names), sum(float((d * d).sum()) for d in dense.values()))
        got = terms[method]
        assert (got.t, got.c, got.j) == pytest.approx(want, rel=1e-9), method


def test_projections_match_dense(case, features):
    c = len(case.traj.steps) - 1
    directions = {u.name: (features.get(u.name, "global", "u")[c].double(), features.get(u.name, "global", "v")[c].double())
                  for u in case.matrices[:3]}
    got = case.traj.projections(directions, list(range(c + 1)))
    for name, (u, v) in directions.items():
        want = torch.stack([u @ case.delta(i, name) @ v for i in range(c + 1)])
        if case.traj.kind == "lora":  # float32 matrix-vector products of the factors (lorastream._project): 2.3e-7 measured
            assert (got[name] - want).abs().max() <= 1e-6 * want.abs().max(), name
        else:
            assert torch.allclose(got[name].double(), want, rtol=1e-9, atol=1e-12), name


@pytest.fixture(scope="module")
def jumps(case, features):
    c = len(case.traj.steps) - 1
    models = fit_models(features, METHODS, TrainSettings(epochs=FAST_EPOCHS), trajectory=case.traj)
    return {m: jump(m, JumpContext(features, case.traj, c, models)) for m in METHODS}


def test_every_method_moves_the_right_modules_finitely(case, jumps):
    units = {u.name: u for u in case.traj.units}
    c = len(case.traj.steps) - 1
    for method, j in jumps.items():
        assert set(j.factors) <= set(units), method
        for name, (p, q) in j.factors.items():
            assert p.shape[0] * q.shape[0] == math.prod(units[name].shape) and p.shape[1] == q.shape[1], (method, name)
            assert torch.isfinite(p).all() and torch.isfinite(q).all(), (method, name)
        assert j.difference is None or j.difference[0] == c, method
        assert j.difference is not None or j.factors, method  # every method moves something
        factors = case.traj.move_factors(j)
        if factors is not None:  # where the trajectory holds the move as factors, they are the dense move
            for unit in case.matrices[:3]:
                p, q = factors[unit.name]
                assert torch.allclose(p @ q.mT, case.move(j, unit.name), atol=1e-10), (method, unit.name)


def _written(case: Case, fmt: str, out: Path, tmp: Path) -> dict[str, tuple[torch.Tensor, float]]:
    """Per matrix unit, the weight W that ``fmt`` wrote into ``out`` (an adapter: W_0 + s' B' A') in float64, and
    the relative precision of the dtype it was stored in."""
    base = model_state(case.base)
    if fmt == "adapter":  # read back as a one-checkpoint LoRA run: s' B' A' with the written rank and alpha
        shutil.copytree(out, tmp / "written" / "step_1")
        written = load_trajectory(tmp / "written")
        weights = {}
        for m in written.modules:
            b, a = written.factors(0, [m.name], dtype=torch.float32)
            w = base[case.weight_key(m.name)].double() + m.scale * b[0].double() @ a[0].double()
            weights[m.name] = (w, torch.finfo(torch.float32).eps)
        return weights
    state = model_state(out)
    return {u.name: (state[case.weight_key(u.name)].double().reshape(u.shape), torch.finfo(state[case.weight_key(u.name)].dtype).eps)
            for u in case.matrices}


@pytest.mark.parametrize("method", ["linear", "next-paper"])
def test_writers_give_w_row_plus_alpha_move(case, jumps, method, tmp_path):
    traj, c, alpha = case.traj, len(case.traj.steps) - 1, 1.5
    j = jumps[method]
    base = model_state(case.base)
    for fmt in traj.formats:
        out = tmp_path / fmt
        traj.write(out, fmt, c, j, alpha, case.base, 10**9)
        for name, (w, eps) in _written(case, fmt, out, tmp_path / f"read-{fmt}").items():
            # the base format is W_0 + alpha * move: the checkpoint's own adapter adds W_row - W_0 on top
            want = (base[case.weight_key(name)].double().reshape(w.shape) + alpha * case.move(j, name)
                    + (0 if fmt == "base" else case.delta(c, name)))
            assert torch.allclose(w, want, rtol=2 * eps, atol=1e-6), (fmt, name)  # one rounding to the stored dtype


def test_inspect_reports_layout_steps_and_rank1_energies(case):
    d = diagnose(case.root, base=case.opened_with)
    layout = case.traj.layout()
    assert d.layout == layout.layout and d.steps == case.traj.steps and d.units_label == layout.units_label
    assert [m.name for m in d.modules] == [u.name for u in case.matrices]
    energy = []
    for unit in case.matrices:
        s = torch.stack([torch.linalg.svdvals(case.delta(i, unit.name)) for i in range(len(d.steps))])
        energy.append(torch.where(s[:, 0] > 1e-9 * s[:, 0].max(), s[:, 0] / s.sum(-1), torch.nan))
    for i, (step, got) in enumerate(zip(d.steps, d.energy_overall)):
        values = [float(e[i]) for e in energy if not math.isnan(float(e[i]))]
        assert (got is None) == (not values), step
        if values:
            assert got == pytest.approx(statistics.median(values), rel=1e-4), step


def test_a_folder_of_the_other_kind_is_refused_with_what_to_do(case, tmp_path):
    from nextrap.core.errors import NextrapError

    if case.opened_with is None:  # adapters read as full-parameter checkpoints
        with pytest.raises(NextrapError, match="holds PEFT adapters; --base is for full-parameter checkpoints"):
            open_trajectory(case.root, base=BASE)
    else:  # model folders read as adapters
        with pytest.raises(NextrapError, match="holds Hugging Face model folders, not PEFT adapters; pass --base"):
            open_trajectory(case.root)
