"""What a pass computed for later passes of the same fit, kept per trajectory object: relex's projections
a_d[i] = u_d^T (W_i - W_0) v_d, which the feature pass computes on the backtest folds' starts d as it reads the
checkpoints (``lorastream.stream_features``, ``fullstream.compute_full_features``), and which ``projections``
then answers from memory instead of reading every checkpoint up to d again; and the checkpoint-pair products
the LoRA passes share (``lorastream._row_products``).

A projection is found again by a fingerprint of its directions (their float32 bytes, hashed: the directions are
stored float32 features, and a digest holds no copy of them); (-u, -v) gives the same numbers. Stores live as long
as the trajectory object: its checkpoints are read as they were when it was loaded, and a reloaded trajectory
starts afresh.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Mapping, Sequence

import torch

_STORES: dict[tuple[str, int], dict] = {}


def store(what: str, traj: Any) -> dict:
    """The store named ``what`` of trajectory object ``traj`` (created empty, dropped with the object)."""
    key = (what, id(traj))
    if key not in _STORES:
        _STORES[key] = {}
        weakref.finalize(traj, _STORES.pop, key, None)
    return _STORES[key]


def fingerprint(u: torch.Tensor, v: torch.Tensor) -> bytes:
    """A digest of the directions' float32 bytes."""
    h = hashlib.sha256()
    for x in (u, v):
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.digest()


def held_bytes(traj: Any) -> int:
    """Bytes the kept projections of ``traj`` hold (a later pass counts them as held)."""
    return sum(a.numel() * a.element_size() for kept in store("projections", traj).values() for a in kept.values())


def recall_all(traj: Any, directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
               rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """``recall`` for each of ``names`` that has directions: the projections a pass kept, by unit name."""
    found = {n: recall(traj, n, *directions[n], rows) for n in names if n in directions}
    return {n: a for n, a in found.items() if a is not None}


def remember(traj: Any, name: str, u: torch.Tensor, v: torch.Tensor, values: torch.Tensor) -> None:
    """Keep unit ``name``'s projections [a_0, ..., a_d] (float64) on the directions (u, v)."""
    store("projections", traj).setdefault(name, {})[fingerprint(u, v)] = values.detach().to("cpu", torch.float64)


def recall(traj: Any, name: str, u: torch.Tensor, v: torch.Tensor, rows: Sequence[int]) -> torch.Tensor | None:
    """Unit ``name``'s projections on (u, v) (or on (-u, -v)) at ``rows``, if a pass kept them all; else None."""
    kept = store("projections", traj).get(name)
    if not kept or not rows or min(rows) < 0:
        return None
    for key in (fingerprint(u, v), fingerprint(-u, -v)):
        if key in kept and max(rows) < len(kept[key]):
            return kept[key][list(rows)]
    return None
