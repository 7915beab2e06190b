import json

import pytest
import torch

import nextrap
from conftest import TRAJECTORY, model_state
from nextrap.io.checkpoints import load_trajectory
from nextrap.core.errors import NextrapError
from nextrap.methods import METHODS
from nextrap.api.extend import alpha_folder, parse_alphas


def test_parse_alphas():
    assert parse_alphas("1.5") == [1.5]
    assert parse_alphas("1.0,1.5") == [1.0, 1.5]
    assert parse_alphas("0.5:4.0:0.5") == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert parse_alphas("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert parse_alphas("auto") is None
    for bad in ("x", "1:2", "2:1:0.5", "1:2:0", "nan", "1,1"):
        with pytest.raises(NextrapError, match="--alpha"):
            parse_alphas(bad)
    assert [alpha_folder(a) for a in (1.0, 1.5, 0.25, 4)] == ["alpha-1.0", "alpha-1.5", "alpha-0.25", "alpha-4.0"]


def test_one_fit_many_alphas_with_provenance(fitted, tmp_path):
    res = nextrap.extend(fitted, [0.5, 1.5], tmp_path / "out", method="next")
    assert [p.name for p in res.folders] == ["alpha-0.5", "alpha-1.5"]
    for alpha, folder in zip(res.alphas, res.folders):
        info = json.loads((folder / "nextrap.json").read_text())
        assert info["alpha"] == alpha and info["method"] == "next" and info["horizon"] == 5
        assert info["from_step"] == 160 and info["source_steps"][-1] == 160
        assert len(info["predicted_sigma"]) == 14
        assert [b["method"] for b in info["backtest"]] == [*METHODS, "oracle-rank1"]
        assert info["backtest_error"] > 0
        assert (folder / "prediction.safetensors").is_file() and (folder / "adapter_model.safetensors").is_file()


def test_the_default_method_is_the_one_the_backtest_chooses(fitted, tmp_path):
    res = nextrap.extend(fitted, [1.5], tmp_path / "out")
    assert res.choice is not None and res.method == res.choice.method
    assert json.loads((tmp_path / "out" / "nextrap.json").read_text())["method"] == res.choice.method


def test_linear_adapter_is_exact(fitted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import BASE

    res = nextrap.extend(fitted, [2.0], tmp_path / "lin", method="linear")
    traj = load_trajectory(TRAJECTORY)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), res.out)
    assert model.peft_config["default"].r == 8 + 16  # the move W_c - W_{c-h} has rank 2r
    merged = model.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(BASE).state_dict()
    for m in traj.modules:
        (b1, a1), (b0, a0) = traj.factors(16, [m.name]), traj.factors(11, [m.name])
        w_c, w_h = m.scale * b1[0] @ a1[0], m.scale * b0[0] @ a0[0]
        expected = base[m.base_key].double() + w_c + 2.0 * (w_c - w_h)
        assert torch.allclose(merged[m.base_key].double(), expected, atol=1e-6)


def test_nan_prediction_is_refused_and_nothing_is_written(fitted, tmp_path, monkeypatch):
    from nextrap.methods.predictor import NExtMLP

    monkeypatch.setattr(NExtMLP, "forward", lambda self, g, l: torch.full_like(g, float("nan")))
    with pytest.raises(NextrapError, match="NaN"):
        nextrap.extend(fitted, [1.0], tmp_path / "out", method="next-paper")
    assert list(tmp_path.iterdir()) == []


def test_bad_method_and_format(fitted, tmp_path):
    with pytest.raises(NextrapError, match="--method"):
        nextrap.extend(fitted, [1.0], tmp_path / "o", method="magic")
    with pytest.raises(NextrapError, match="--format"):
        nextrap.extend(fitted, [1.0], tmp_path / "o", fmt="gguf")


def test_auto_chooses_no_jump_on_a_random_walk(tmp_path):
    """Updates that are pure noise (a random walk in the factors): nothing can predict the next move."""
    from conftest import LORA_CONFIG, write_adapter

    modules = {"base_model.model.layers.0.q": (64, 48, 8), "base_model.model.layers.0.k": (32, 48, 8)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (m, n, r) in modules.items():
        state[f"{name}.lora_A.weight"] = torch.randn(r, n, generator=g)
        state[f"{name}.lora_B.weight"] = torch.zeros(m, r)
    for i in range(12):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        write_adapter(tmp_path / "ckpts" / f"step_{i}", state, LORA_CONFIG)
    nextrap.fit(tmp_path / "ckpts", out=tmp_path / "fit", horizon=1, epochs=5, backtest_folds=3)
    res = nextrap.extend(tmp_path / "fit", None, tmp_path / "out", method="auto")
    assert res.choice.alpha == 0.0 and res.alphas == [0.0], res.choice
    assert any("no jump" in w for w in res.warnings)
    from safetensors.torch import load_file
    jumped = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for k, v in state.items():  # the trained factors are the last checkpoint's; the appended column is zero
        assert torch.equal(jumped[k][: v.shape[0], : v.shape[1]], v)
        assert (jumped[k].abs().sum() - v.abs().sum()).abs() < 1e-6


def test_min_energy_jumps_only_the_energetic_modules(fitted, tmp_path):
    from safetensors.torch import load_file

    from nextrap.core.features import Features

    feats = Features.load(fitted / "trajectory.safetensors")
    energy = {m: float(feats.get(m, "global", "energy")[-1]) for m in feats.modules}
    cut = sorted(energy.values())[len(energy) // 2]
    nextrap.extend(fitted, [1.5], tmp_path / "out", min_energy=cut)
    pred = load_file(str(tmp_path / "out" / "prediction.safetensors"))
    assert {m for m in feats.modules if float(pred[f"{m}:sigma"]) > 0} == {m for m, e in energy.items() if e >= cut}
    info = json.loads((tmp_path / "out" / "nextrap.json").read_text())
    assert info["min_energy"] == cut


@pytest.mark.parametrize("method", METHODS)
def test_base_format_plus_the_last_checkpoint_equals_the_jumped_adapter(fitted, tmp_path, method):
    """W_c + alpha * move = (W_0 + alpha * move) + s B_c A_c: checkpoint c's own adapter on the folded base is
    the rank-grown jumped adapter on the original base, every weight within float32 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import BASE

    folded = nextrap.extend(fitted, [1.5], tmp_path / "base", fmt="base", base=BASE, method=method,
                            max_shard_size="100KB").out
    grown = nextrap.extend(fitted, [1.5], tmp_path / "adapter", method=method).out
    info = json.loads((folded / "nextrap.json").read_text())
    ckpt = TRAJECTORY / "step_160"
    assert info["format"] == "base" and info["resume_from"]["step"] == 160
    assert info["resume_from"]["path"] == str((fitted.parent / "ckpts" / "step_160").absolute())
    assert len(list(folded.glob("model-*.safetensors"))) > 1 and (folded / "config.json").is_file()

    resumed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folded), ckpt).merge_and_unload().state_dict()
    jumped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), grown).merge_and_unload().state_dict()
    lora_keys = {m.base_key for m in load_trajectory(TRAJECTORY).modules}
    base, written = model_state(BASE), model_state(folded)
    assert set(written) == set(base)
    for k in base:  # everything not LoRA-targeted is the base's, bit for bit
        assert k in lora_keys or torch.equal(written[k], base[k]), k
    worst = max(float((resumed[k] - jumped[k]).abs().max()) for k in jumped)
    assert worst < 1e-6, worst  # measured 7.5e-9 for every method: float32 rounding
    assert any(not torch.equal(written[k], base[k]) for k in lora_keys)


def test_base_format_needs_a_base_and_a_lora_fit(fitted, tmp_path):
    with pytest.raises(NextrapError, match="--format base needs --base"):
        nextrap.extend(fitted, [1.0], tmp_path / "b", fmt="base")
    assert not (tmp_path / "b").exists()
