import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAJECTORY
from nextrap.io.checkpoints import load_trajectory
from nextrap.core.errors import NextrapError
from nextrap.core.lowrank import top1_dense
from nextrap.core.features import Features
from nextrap.engine.lorafeatures import compute_features

H = 5


@pytest.fixture(scope="module")
def traj():
    return load_trajectory(TRAJECTORY)


@pytest.fixture(scope="module")
def feats(traj):
    return compute_features(traj, H)


def _dense_global(traj, row):
    """W_i - W_0 for every module straight from the safetensors file (independent of nextrap's reader)."""
    sd = load_file(str(traj.checkpoints[row].weights))
    cfg = json.loads((traj.checkpoints[row].path / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    return {m.name: s * sd[f"{m.name}.lora_B.weight"].double() @ sd[f"{m.name}.lora_A.weight"].double() for m in traj.modules}


def test_features_match_dense_svd_of_merged_deltas(traj, feats):
    n = len(traj.steps)
    dense = [_dense_global(traj, i) for i in range(n)]
    worst_sigma, worst_cos = 0.0, 1.0
    for m in feats.modules:
        g = torch.stack([d[m] for d in dense])
        merged = {"global": (g, range(n)),
                  "local": (torch.cat([g[:1], g[1:] - g[:-1]]), range(n)),
                  "target": (g[H:] - g[:-H], range(n - H))}
        for kind, (x, rows) in merged.items():
            ref = top1_dense(x)
            sigma = feats.get(m, kind, "sigma")[list(rows)].double()
            zero = ref.sigma == 0
            assert (sigma[zero] == 0).all()
            keep = ~zero
            worst_sigma = max(worst_sigma, float(((sigma - ref.sigma).abs()[keep] / ref.sigma[keep]).max()))
            for part, r in (("u", ref.u), ("v", ref.v)):
                cos = (feats.get(m, kind, part)[list(rows)].double() * r).sum(-1).abs()[keep]
                worst_cos = min(worst_cos, float(cos.min()))
    assert worst_sigma <= 1e-5
    assert worst_cos >= 0.9999


def test_global_delta_matches_peft_merge(traj):
    """Our reading of scale and layout agrees with PEFT's own merge of the adapter into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import BASE

    row = len(traj.steps) - 1
    base = AutoModelForCausalLM.from_pretrained(BASE)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, traj.checkpoints[row].path).merge_and_unload().state_dict()
    dense = _dense_global(traj, row)
    for m in traj.modules:
        assert torch.allclose((merged[m.base_key] - w0[m.base_key]).double(), dense[m.name], atol=1e-6)


def test_step0_adapter_gives_zero_features_not_nan(feats):
    assert feats.steps[0] == 0
    for m in feats.modules:
        for kind in ("global", "local"):
            for part in ("sigma", "u", "v"):
                row0 = feats.get(m, kind, part)[0]
                assert torch.isfinite(row0).all() and (row0 == 0).all()
        assert torch.isfinite(feats.get(m, "global", "energy")).all()


def test_target_rows_past_the_end_are_nan(feats):
    sig = feats.get(feats.modules[0], "target", "sigma")
    assert torch.isfinite(sig[: feats.n_rows - H]).all() and torch.isnan(sig[feats.n_rows - H:]).all()


def test_signs_are_aligned_by_default_and_not_with_no_sign_align(traj, feats):
    raw = compute_features(traj, H, sign_align=False)
    flips_raw = 0
    for m in feats.modules:
        for kind in ("global", "local"):
            u, v = feats.get(m, kind, "u")[1:], feats.get(m, kind, "v")[1:]
            agree = (u[1:] * u[:-1]).sum(-1) + (v[1:] * v[:-1]).sum(-1)
            assert (agree >= 0).all()
            ur = raw.get(m, kind, "u")[1:]
            vr = raw.get(m, kind, "v")[1:]
            flips_raw += int(((ur[1:] * ur[:-1]).sum(-1) + (vr[1:] * vr[:-1]).sum(-1) < 0).sum())
            # same matrices either way
            assert torch.allclose(u[:, :, None] * v[:, None, :], ur[:, :, None] * vr[:, None, :], atol=1e-6)
    assert flips_raw > 0  # the fixture does show SVD sign flips without alignment


def test_save_load_roundtrip_and_truncate(tmp_path, feats):
    path = tmp_path / "t.safetensors"
    feats.save(path)
    back = Features.load(path)
    assert back.steps == feats.steps and back.horizon == H and back.modules == feats.modules
    m = feats.modules[3]
    assert torch.equal(back.get(m, "local", "u"), feats.get(m, "local", "u"))
    assert back.get(m, "global", "u").shape == (feats.n_rows, feats.get(m, "global", "u").shape[1])
    cut = feats.truncate(10)
    assert cut.steps == feats.steps[:10]
    assert torch.isnan(cut.get(m, "target", "sigma")[10 - H:]).all()
    assert torch.equal(cut.get(m, "target", "sigma")[: 10 - H], feats.get(m, "target", "sigma")[: 10 - H])


def test_too_few_checkpoints_for_horizon(traj):
    with pytest.raises(NextrapError, match="horizon 17 needs at least 18"):
        compute_features(traj, 17)


def test_not_a_trajectory_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(NextrapError, match="not a nextrap trajectory file"):
        Features.load(bad)
