"""Rank-1 features of a trajectory, the value every method learns from: per unit (a LoRA module or a parameter) and
checkpoint row, the top singular triple (sigma, u, v) of the global, local and target deltas, as stored in a fit
folder's ``trajectory.safetensors``.

Row i is checkpoint i in step order; the base model (zero delta) is the reference point W_0:
    global  G_i = W_i - W_0
    local   L_i = W_i - W_{i-1}        (L_0 = W_0' - W_0 for the first saved checkpoint)
    target  T_i = W_{i+h} - W_i        (NaN where i + h is past the last checkpoint)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextrap.core.errors import NextrapError, first_line
from nextrap.core.lowrank import align_signs

KINDS = ("global", "local", "target")
PARTS = ("sigma", "u", "v")
VEC = "vec"  # 1-D parameters (full fine-tuning): the raw delta vector, not decomposed (as the reference does)


@dataclass
class Features:
    """The contents of ``trajectory.safetensors``: keys ``{module}:{kind}:{part}``, rows in step order."""

    steps: list[int]
    horizon: int
    sign_align: bool
    modules: list[str]
    tensors: dict[str, torch.Tensor]

    def get(self, module: str, kind: str, part: str) -> torch.Tensor:
        return self.tensors[f"{module}:{kind}:{part}"]

    def is_vector(self, module: str) -> bool:
        """True for a 1-D parameter, stored as its raw delta ``{module}:{kind}:vec`` instead of (sigma, u, v)."""
        return f"{module}:global:{VEC}" in self.tensors

    def moved(self, module: str, row: int) -> bool:
        """Whether the global delta of ``module`` at ``row`` is nonzero."""
        if self.is_vector(module):
            return bool(self.get(module, "global", VEC)[row].abs().sum() > 0)
        return float(self.get(module, "global", "sigma")[row]) > 0

    def moved_rows(self) -> list[int]:
        """Rows where some module has moved from W_0 (a saved step-0 adapter, B = 0, is the base model)."""
        return [i for i in range(self.n_rows) if any(self.moved(m, i) for m in self.modules)]

    @property
    def n_rows(self) -> int:
        return len(self.steps)

    def truncate(self, n_rows: int) -> "Features":
        """The features the first ``n_rows`` checkpoints alone would give (targets past them become NaN)."""
        if not 0 < n_rows <= self.n_rows:
            raise ValueError(f"cannot truncate {self.n_rows} rows to {n_rows}")
        out = {}
        for key, t in self.tensors.items():
            t = t[:n_rows].clone()
            if ":target:" in key:
                t[max(n_rows - self.horizon, 0):] = float("nan")
            out[key] = t
        return Features(self.steps[:n_rows], self.horizon, self.sign_align, self.modules, out)

    def aligned(self) -> "Features":
        """These features with SVD's arbitrary sign removed along each module's checkpoints (``align_signs``):
        u v^T is unchanged, but u no longer flips between +u and -u from one checkpoint to the next."""
        if self.sign_align:
            return self
        out = dict(self.tensors)
        for module in self.modules:
            for kind in KINDS:
                key_u, key_v = f"{module}:{kind}:u", f"{module}:{kind}:v"
                if key_u not in out:
                    continue
                u, v = out[key_u].clone(), out[key_v].clone()
                known = torch.isfinite(u).all(-1) & torch.isfinite(v).all(-1)  # targets past the end are NaN
                u[known], v[known] = align_signs(u[known], v[known])
                out[key_u], out[key_v] = u, v
        return Features(self.steps, self.horizon, True, self.modules, out)

    def save(self, path: Path) -> None:
        meta = {"steps": json.dumps(self.steps), "horizon": str(self.horizon), "sign_align": json.dumps(self.sign_align),
                "modules": json.dumps(self.modules)}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "Features":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return cls(json.loads(meta["steps"]), int(meta["horizon"]), json.loads(meta["sign_align"]),
                       json.loads(meta["modules"]), tensors)
        except NextrapError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt file or missing metadata: same user-facing problem
            raise NextrapError(f"{path}: not a nextrap trajectory file ({first_line(e)})") from None
