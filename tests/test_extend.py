import json

import pytest
import torch

import nextrap
from conftest import BASE, TRAJECTORY, model_state
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


@pytest.fixture(scope="module")
def random_walk(tmp_path_factory):
    """Updates that are pure noise (a random walk in the factors): nothing can predict the next move. Returns the
    fit folder and the last checkpoint's tensors."""
    from conftest import LORA_CONFIG, write_adapter

    root = tmp_path_factory.mktemp("random-walk")
    modules = {"base_model.model.layers.0.q": (64, 48, 8), "base_model.model.layers.0.k": (32, 48, 8)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (m, n, r) in modules.items():
        state[f"{name}.lora_A.weight"] = torch.randn(r, n, generator=g)
        state[f"{name}.lora_B.weight"] = torch.zeros(m, r)
    for i in range(12):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        write_adapter(root / "ckpts" / f"step_{i}", state, LORA_CONFIG)
    nextrap.fit(root / "ckpts", out=root / "fit", horizon=1, epochs=5, backtest_folds=3)
    return root / "fit", state


def test_auto_chooses_no_jump_on_a_random_walk(random_walk, tmp_path):
    fit, state = random_walk
    res = nextrap.extend(fit, None, tmp_path / "out", method="auto")
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


def test_an_alpha_given_without_a_winning_method_is_the_alpha_reported(random_walk, tmp_path):
    """--method auto --alpha 1.5 where no method beats standing still: 1.5 is written, and the choice names it."""
    from typer.testing import CliRunner

    from nextrap.cli import app

    fit, _ = random_walk
    res = nextrap.extend(fit, [1.5], tmp_path / "lib", method="auto")
    assert res.alphas == [1.5] and res.choice.alpha == 1.5 and res.choice.error == res.backtest_error[1.5]
    assert "no jump" in res.choice.reason and any("writing the requested alphas" in w for w in res.warnings)
    out = CliRunner().invoke(app, ["extend", "--fit", str(fit), "--alpha", "1.5", "--out", str(tmp_path / "j"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["choice"]["alpha"] == 1.5
    human = CliRunner().invoke(app, ["extend", "--fit", str(fit), "--alpha", "1.5", "--out", str(tmp_path / "h")],
                               env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "alpha 1.5:" in human.stdout and "alpha 0" not in human.stdout


def test_min_energy_is_an_energy_from_0_to_1(fitted, tmp_path):
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(NextrapError, match="--min-energy .*: use a number from 0 to 1"):
            nextrap.extend(fitted, [1.0], tmp_path / "out", min_energy=bad)
    assert not (tmp_path / "out").exists()


def test_min_energy_that_leaves_modules_out_reports_no_backtest_error_and_warns(fitted, tmp_path):
    """The backtest measured the whole move, not the filtered one: its error is not reported as the jump's."""
    from nextrap.core.features import Features

    feats = Features.load(fitted / "trajectory.safetensors")
    cut = sorted(float(feats.get(m, "global", "energy")[-1]) for m in feats.modules)[len(feats.modules) // 2]
    res = nextrap.extend(fitted, [0.0, 1.5], tmp_path / "out", method="next", min_energy=cut)
    assert res.backtest_error == {0.0: 1.0, 1.5: None}
    assert json.loads((tmp_path / "out" / "alpha-1.5" / "nextrap.json").read_text())["backtest_error"] is None
    assert any("backtest measured the whole move" in w for w in res.warnings)
    auto = nextrap.extend(fitted, None, tmp_path / "auto", min_energy=cut)
    assert auto.backtest_error == {auto.alphas[0]: None}
    assert any("--method and --alpha auto chose on the whole move" in w for w in auto.warnings)
    kept = nextrap.extend(fitted, [1.5], tmp_path / "kept", method="next", min_energy=1e-9)  # every module passes
    assert kept.backtest_error[1.5] is not None and not any("whole move" in w for w in kept.warnings)


def test_min_energy_above_every_module_is_refused(fitted, tmp_path):
    with pytest.raises(NextrapError, match="--min-energy 1: no module's rank-1 energy .* nothing to jump"):
        nextrap.extend(fitted, [1.5], tmp_path / "out", method="next", min_energy=1.0)
    assert not (tmp_path / "out").exists()


def test_alphas_that_share_a_folder_name_and_huge_ranges_are_refused(fitted, tmp_path):
    with pytest.raises(NextrapError, match="--alpha 1.0000001 and 1.0000002: both would be written to alpha-1.0/"):
        nextrap.extend(fitted, [1.0000001, 1.0000002], tmp_path / "out", method="next")
    assert not (tmp_path / "out").exists()
    assert len(parse_alphas("0:99:1")) == 100
    for text in ("0:1000:0.001", "0:100:1", "0:1e300:1"):
        with pytest.raises(NextrapError, match="at most 100"):
            parse_alphas(text)
    with pytest.raises(NextrapError, match="at most 100"):
        parse_alphas(",".join(str(i) for i in range(101)))


def test_a_bad_shard_size_names_the_option(fitted, tmp_path):
    with pytest.raises(NextrapError, match="--max-shard-size 'abc': cannot read the size"):
        nextrap.extend(fitted, [1.0], tmp_path / "out", fmt="merged", base=BASE, max_shard_size="abc")
