"""``nextrap inspect``: what a checkpoint folder holds, and the paper's two diagnostics of its trajectory.

(a) Rank-1 energy ``sigma_1 / sum_j sigma_j`` of each module's global delta ``W_i - W_0`` per checkpoint (the
    paper's Figure 2), as medians over the modules of one type (``q_proj``, ...) or one layer.
(b) Linearity (the paper's Sec. 3): a least-squares straight line over time (the step) is fitted to each
    module's rank-1 components ``sigma``, ``sigma * u`` and ``v`` on the first K checkpoints and predicts the
    later ones; ``R^2 = 1 - SS_res / SS_tot``, pooled over coordinates and predicted checkpoints. The paper
    finds R^2 < 0.5 for over half of the parameters, which is why NExt uses a nonlinear predictor.

Zero-delta rows (a step-0 adapter has B = 0, so no direction) are left out of both, never turned into NaN.
The math is in pure functions (``line_fit_r2``, ``masked_medians``, ``summarize_r2``); ``diagnose`` reads.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nextrap.core.errors import NextrapError
from nextrap.trajectories.opening import open_trajectory
from nextrap.api.plotting import plot_path, pyplot

R2_THRESHOLD = 0.5  # the paper's cut: "over 50% of parameters have R^2 < 0.5"
PARTS = ("sigma", "u", "v")  # u is fitted as sigma * u, so that the scale counts
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
# ----------------------------------------------------------------------------------------------- pure math

def line_fit_r2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor) -> float | None:
    """Out-of-sample R^2 of a least-squares line ``y = a + b x`` (one per coordinate) fitted on (x_fit, y_fit).

    x [T], y [T] or [T, d]. ``R^2 = 1 - sum (y_eval - y_hat)^2 / sum (y_eval - mean_eval(y))^2``, both sums over
    all coordinates and evaluated rows. None when undefined: fewer than 2 distinct fit times, nothing to
    evaluate, or no spread in the evaluated values (a single evaluated row, or a constant trajectory).
    """
    x_fit, x_eval = x_fit.to(torch.float64), x_eval.to(torch.float64)
    y_fit, y_eval = y_fit.to(torch.float64), y_eval.to(torch.float64)
    if y_fit.dim() == 1:
        y_fit, y_eval = y_fit[:, None], y_eval[:, None]
    if x_fit.numel() < 2 or x_eval.numel() < 1:
        return None
    dx = x_fit - x_fit.mean()
    sxx = (dx * dx).sum()
    if sxx <= 0:
        return None
    y_mean = y_fit.mean(0)
    slope = (dx[:, None] * (y_fit - y_mean)).sum(0) / sxx
    y_hat = y_mean + slope * (x_eval - x_fit.mean())[:, None]
    ss_res = ((y_eval - y_hat) ** 2).sum()
    ss_tot = ((y_eval - y_eval.mean(0)) ** 2).sum()
    if not ss_tot > 1e-12 * (y_eval ** 2).sum() or not torch.isfinite(ss_res):
        return None
    return float(1 - ss_res / ss_tot)


def masked_medians(values: torch.Tensor, keep: torch.Tensor) -> list[float | None]:
    """Per column, the median of values [rows, T] over the rows where ``keep`` [rows, T]; None where none are kept.

    An even count gives the mean of the middle two (as numpy.median does).
    """
    out: list[float | None] = []
    for t in range(values.shape[1]):
        kept = values[:, t][keep[:, t]]
        out.append(float(statistics.median(kept.tolist())) if kept.numel() else None)
    return out


def summarize_r2(values: Sequence[float | None], threshold: float = R2_THRESHOLD) -> dict[str, Any]:
    """``n`` modules, ``n_defined`` with an R^2, their ``median`` and the fraction ``frac_below`` the threshold."""
    defined = [v for v in values if v is not None]
    return {"n": len(values), "n_defined": len(defined),
            "median": float(statistics.median(defined)) if defined else None,
            "frac_below": sum(v < threshold for v in defined) / len(defined) if defined else None}


def nonzero_rows(sigma: torch.Tensor) -> torch.Tensor:
    """Rows of a sigma trajectory [T] whose delta is not (numerically) zero."""
    top = sigma.abs().max() if sigma.numel() else torch.tensor(0.0)
    return sigma > 1e-7 * top if top > 0 else torch.zeros_like(sigma, dtype=torch.bool)


def module_linearity(steps: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_fit: int) -> dict[str, float | None]:
    """R^2 of the line through the first ``n_fit`` checkpoints' sigma, sigma * u and v, on the later ones.

    steps [T], sigma [T], u [T, m], v [T, n]; zero-delta rows are dropped from both the fit and the evaluation.
    """
    keep = nonzero_rows(sigma)
    early = torch.arange(len(steps)) < n_fit
    fit_rows, eval_rows = keep & early, keep & ~early
    series = {"sigma": sigma, "u": sigma[:, None] * u, "v": v}
    return {p: line_fit_r2(steps[fit_rows], y[fit_rows], steps[eval_rows], y[eval_rows]) for p, y in series.items()}


# ----------------------------------------------------------------------------------------------- reading

def module_type(name: str) -> str:
    """``...layers.3.self_attn.q_proj`` (or a full parameter's ``...q_proj.weight``) -> ``q_proj``."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def module_layer(name: str) -> int | None:
    """``...layers.3.self_attn.q_proj`` -> 3 (also ``.h.N.``, ``.blocks.N.``, ``.layer.N.``); None outside layers."""
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------- result

@dataclass
class ModuleReport:
    name: str
    type: str
    layer: int | None
    out_features: int
    in_features: int
    rank: int | None  # None for a full-parameter matrix
    r2: dict[str, float | None]  # part -> R^2 (None when undefined)


@dataclass
class Diagnosis:
    """Everything ``nextrap inspect`` reports; ``to_json`` is its ``--json`` output."""

    root: Path
    layout: str
    trainer: str
    steps: list[int]
    dtypes: list[str]
    size_bytes: int  # every file in the checkpoint folders
    weights_bytes: int  # their weights files alone
    units_label: str  # how reports name ``modules`` (LoRA modules, weight matrices)
    weights_label: str  # what the weights files hold (adapter, model)
    modules: list[ModuleReport]
    energy_overall: list[float | None]  # per step, median over all modules (None: every delta is zero)
    energy_by_type: dict[str, list[float | None]]
    energy_by_layer: dict[int | None, list[float | None]]
    fit_checkpoints: int

    @property
    def fit_steps(self) -> list[int]:
        return self.steps[:self.fit_checkpoints]

    @property
    def predicted_steps(self) -> list[int]:
        return self.steps[self.fit_checkpoints:]

    def r2_summary(self, by: str | None = None) -> list[dict[str, Any]]:
        """R^2 summaries per part, over all modules (by=None) or per ``type`` / ``layer``."""
        groups: dict[Any, list[ModuleReport]] = {}
        for m in self.modules:
            groups.setdefault(getattr(m, by) if by else "all", []).append(m)
        rows = []
        for key in sorted(groups, key=lambda k: (k is None, k)):
            row: dict[str, Any] = {by: key} if by else {}
            row["modules"] = len(groups[key])
            row.update({p: summarize_r2([m.r2[p] for m in groups[key]]) for p in PARTS})
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        types = sorted({m.type for m in self.modules})
        layers = sorted({m.layer for m in self.modules}, key=lambda k: (k is None, k))
        return {
            "root": str(self.root), "layout": self.layout, "trainer": self.trainer, "steps": self.steps,
            "checkpoints": len(self.steps), "dtypes": self.dtypes, "size_bytes": self.size_bytes,
            "weights_bytes": self.weights_bytes,
            "modules": {
                "count": len(self.modules), "types": {t: sum(m.type == t for m in self.modules) for t in types},
                "layers": layers, "ranks": sorted({m.rank for m in self.modules if m.rank is not None}),
                "list": [{"name": m.name, "type": m.type, "layer": m.layer, "out_features": m.out_features,
                          "in_features": m.in_features, "rank": m.rank} for m in self.modules],
            },
            "energy": {
                "definition": "sigma_1 / sum_j sigma_j of W_i - W_0; median over modules; null where every delta is zero",
                "steps": self.steps, "overall": self.energy_overall,
                "by_type": [{"type": t, "median": v} for t, v in sorted(self.energy_by_type.items())],
                "by_layer": [{"layer": k, "median": self.energy_by_layer[k]} for k in layers],
            },
            "linearity": {
                "definition": "least-squares line over step on the first fit_checkpoints; R^2 on the later ones, "
                              "pooled over coordinates; u is fitted as sigma*u; zero-delta rows skipped",
                "fit_checkpoints": self.fit_checkpoints, "fit_steps": self.fit_steps,
                "predicted_steps": self.predicted_steps, "threshold": R2_THRESHOLD,
                "overall": self.r2_summary()[0] if self.modules else None,
                "by_type": self.r2_summary("type"), "by_layer": self.r2_summary("layer"),
                "modules": [{"name": m.name, "r2": m.r2} for m in self.modules],
            },
        }


def default_fit_checkpoints(n: int) -> int:
    """The first 2/3 of the checkpoints (the paper fits 10 of 15), at least 2 and leaving at least 1."""
    return min(max(2, (2 * n) // 3), n - 1)


def diagnose(ckpts: Path | str, fit_checkpoints: int | None = None, base: Path | str | None = None,
             max_memory: str | None = None) -> Diagnosis:
    """Read a trajectory folder and compute its layout facts, rank-1 energies and linearity R^2. With ``base``,
    ``ckpts`` holds full-parameter model folders; every pass is streamed under ``max_memory`` as in ``fit``."""
    root = Path(ckpts)
    traj = open_trajectory(root, base, max_memory)
    n = len(traj.steps)
    # Only the global deltas are used; horizon 1 is the cheapest valid setting (0 for a single checkpoint).
    feats = traj.features(horizon=min(1, n - 1), sign_align=True)
    layout = traj.layout()
    if fit_checkpoints is None:
        fit_checkpoints = default_fit_checkpoints(n) if n >= 3 else max(n - 1, 0)
    elif not 2 <= fit_checkpoints <= n - 1:
        raise NextrapError(f"--fit-checkpoints {fit_checkpoints}: {root} has {n} checkpoints; use 2 .. {n - 1} "
                           "(fit on the first K, predict the rest)" if n >= 3 else
                           f"--fit-checkpoints {fit_checkpoints}: {root} has {n} checkpoints; the linearity check needs at least 3")
    steps = torch.tensor(traj.steps, dtype=torch.float64)
    reports = []
    for unit in (u for u in traj.units if not u.vector):  # 1-D parameters have no singular vectors to diagnose
        name = unit.name
        sigma = feats.get(name, "global", "sigma")
        r2 = module_linearity(steps, sigma, feats.get(name, "global", "u"), feats.get(name, "global", "v"), fit_checkpoints)
        reports.append(ModuleReport(name, module_type(name), module_layer(name), *unit.shape, unit.rank, r2))

    energy = torch.stack([feats.get(r.name, "global", "energy") for r in reports]).to(torch.float64)
    keep = torch.stack([nonzero_rows(feats.get(r.name, "global", "sigma")) for r in reports])

    def medians(select: list[bool]) -> list[float | None]:
        rows = torch.tensor(select)
        return masked_medians(energy[rows], keep[rows])

    by_type = {t: medians([r.type == t for r in reports]) for t in sorted({r.type for r in reports})}
    by_layer = {k: medians([r.layer == k for r in reports]) for k in {r.layer for r in reports}}
    return Diagnosis(
        root=root, layout=layout.layout, trainer=layout.trainer, steps=traj.steps, dtypes=layout.dtypes,
        size_bytes=layout.size_bytes, weights_bytes=layout.weights_bytes, units_label=layout.units_label,
        weights_label=layout.weights_label, modules=reports,
        energy_overall=masked_medians(energy, keep), energy_by_type=by_type, energy_by_layer=by_layer,
        fit_checkpoints=fit_checkpoints,
    )


# ----------------------------------------------------------------------------------------------- plot

def plot_diagnosis(d: Diagnosis, path: Path | str, overwrite: bool = False) -> Path:
    """Two panels: median rank-1 energy vs step per module type; histogram of linearity R^2 per part. Returns the
    file written (``plot_path``)."""
    path = plot_path(path, overwrite)
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, values in sorted(d.energy_by_type.items()):
        pts = [(s, e) for s, e in zip(d.steps, values) if e is not None]
        if pts:
            left.plot(*zip(*pts), marker="o", markersize=3, label=t)
    left.set(xlabel="step", ylabel="rank-1 energy  σ1 / Σσ  (median)", title="Rank-1 energy of W_i - W_0")
    left.legend(fontsize="small")
    floor = -2.0  # R^2 is unbounded below; lower values are drawn in the first bin
    bins = [floor + 0.1 * i for i in range(31)]
    for part in PARTS:
        vals = [max(m.r2[part], floor) for m in d.modules if m.r2[part] is not None]
        if vals:
            label = "σ·u" if part == "u" else ("σ" if part == "sigma" else "v")
            right.hist(vals, bins=bins, histtype="step", linewidth=1.5, label=label)
    right.axvline(R2_THRESHOLD, color="grey", linestyle="--", linewidth=1)
    right.set(xlabel=f"R² of a straight line (values < {floor:g} drawn at {floor:g})", ylabel="modules",
              title=f"Linearity: fit steps {d.fit_steps[0]}..{d.fit_steps[-1]}, predict the rest" if d.fit_steps else "Linearity")
    right.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as e:
        raise NextrapError(f"{path}: cannot write the plot ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    finally:
        plt.close(fig)
    return path
