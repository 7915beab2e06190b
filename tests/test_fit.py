import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import nextrap
from conftest import FAST_EPOCHS, tree_digest
from nextrap.core.errors import NextrapError
from nextrap.api.fit import load_fit
from nextrap.methods import METHODS


def test_fit_writes_the_documented_folder_and_leaves_inputs_alone(trajectory, tmp_path):
    before = tree_digest(trajectory)
    res = nextrap.fit(trajectory, out=tmp_path / "fit", epochs=FAST_EPOCHS, horizon=5, seed=7)
    assert tree_digest(trajectory) == before
    out = tmp_path / "fit"
    assert sorted(p.name for p in out.iterdir()) == [".nextrap-output.json", "manifest.json", "next.json", "predictor.json",
                                                     "predictor.safetensors", "trajectory.safetensors"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["steps"] == list(range(0, 161, 10)) and man["horizon"] == 5
    assert man["settings"]["seed"] == 7 and man["settings"]["epochs"] == FAST_EPOCHS and man["settings"]["sign_align"] is True
    assert set(man["versions"]) >= {"torch", "peft", "safetensors", "nextrap"}
    entry = man["inputs"][3]
    assert entry["step"] == 30
    assert {f["name"] for f in entry["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in entry["files"])
    with safe_open(str(out / "trajectory.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == man["steps"]
        m = "base_model.model.model.layers.0.self_attn.q_proj"
        assert f.get_slice(f"{m}:global:sigma").get_shape() == [17]
        assert f.get_slice(f"{m}:target:u").get_shape() == [17, 64]
        assert f.get_slice("base_model.model.model.layers.0.mlp.down_proj:local:v").get_shape() == [17, 128]
    assert [b.method for b in res.backtest] == [*METHODS, "oracle-rank1"]
    assert res.n_modules == 14 and set(res.group_losses) == {"sigma", "u32", "u64", "v64", "u128", "v128"}
    loaded = load_fit(out)
    assert loaded.features.steps == man["steps"]


def test_fit_errors(trajectory, tmp_path):
    with pytest.raises(NextrapError, match="horizon 20 needs at least 21"):
        nextrap.fit(trajectory, out=tmp_path / "a", horizon=20, epochs=1)
    assert not (tmp_path / "a").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(NextrapError, match="already exists"):
        nextrap.fit(trajectory, out=tmp_path / "exists", epochs=1)
    with pytest.raises(NextrapError, match="--horizon 0"):
        nextrap.fit(trajectory, out=tmp_path / "b", horizon=0)


def test_short_trajectory_fits_without_a_backtest(trajectory, tmp_path):
    for step in range(80, 161, 10):
        shutil.rmtree(trajectory / f"step_{step}")
    res = nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2)
    assert res.steps == list(range(0, 71, 10)) and res.backtest == []


def test_extend_refuses_inputs_changed_since_the_fit(trajectory, tmp_path):
    nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2, run_backtest=False)
    cfg = trajectory / "step_160" / "adapter_config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(NextrapError, match="step_160/adapter_config.json: changed since it was fitted"):
        nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_input_edited_at_the_same_size_is_refused(trajectory, tmp_path):
    nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2, run_backtest=False)
    weights = trajectory / "step_160" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor, same size: the new modification time sends it to sha256
    weights.write_bytes(bytes(data))
    with pytest.raises(NextrapError, match="step_160/adapter_model.safetensors: changed since it was fitted"):
        nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out")


def test_unchanged_inputs_are_not_hashed_again_unless_their_time_is_ambiguous(trajectory, tmp_path, monkeypatch):
    import os
    import time

    from nextrap.api import fit as fit_module

    nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2, run_backtest=False)
    hashed = []
    real = fit_module.sha256
    monkeypatch.setattr(fit_module, "sha256", lambda f: hashed.append(f.name) or real(f))
    nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "a", method="linear")
    assert hashed == []  # the fixture's files are old: size and time decide
    # a file whose time is as recorded but within the clock's granularity of the record: hashed
    fresh = trajectory / "step_0"
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    entry = next(e for e in manifest["inputs"] if e["path"].endswith("step_0"))
    for f in entry["files"]:
        now = time.time_ns()
        os.utime(fresh / f["name"], ns=(now, now))
        f["mtime_ns"], f["seen_ns"] = now, now
    (tmp_path / "fit" / "manifest.json").write_text(json.dumps(manifest))
    nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "b", method="linear")
    assert sorted(hashed) == ["adapter_config.json", "adapter_model.safetensors"]


def test_fit_saves_every_method_model_and_an_older_fit_still_extends(trajectory, tmp_path):
    res = nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2, run_backtest=False)
    assert set(res.models) == {"next", "next-paper"} and 0 <= res.models["next"]["rho"] <= 1
    loaded = load_fit(tmp_path / "fit")
    assert set(loaded.models) == {"next", "next-paper"}
    (tmp_path / "fit" / "next.json").unlink()  # a fit folder written before `next` had a model
    with pytest.raises(NextrapError, match="no fitted next model"):
        nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out", method="next")
    with pytest.raises(NextrapError, match="--method auto \\(the default\\) .* but the fit has none"):
        nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out")
    assert nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out", method="next-paper").method == "next-paper"


def test_fit_only_some_methods(trajectory, tmp_path):
    res = nextrap.fit(trajectory, out=tmp_path / "fit", epochs=2, methods=("next", "linear"))
    assert [b.method for b in res.backtest] == ["next", "linear", "oracle-rank1"] and res.group_losses == {}
    assert not (tmp_path / "fit" / "predictor.safetensors").exists()
    auto = nextrap.extend(tmp_path / "fit", None, tmp_path / "auto", method="auto")
    best = min((b for b in res.backtest if b.method != "oracle-rank1"), key=lambda b: (round(b.best_error, 9), b.method == "next"))
    assert auto.method == best.method and auto.alphas == [best.best_alpha]
    with pytest.raises(NextrapError, match="no fitted next-paper model"):
        nextrap.extend(tmp_path / "fit", [1.0], tmp_path / "out", method="next-paper")
    with pytest.raises(NextrapError, match="--alpha auto: no backtest for method 'expo' in the fit's manifest.json"):
        nextrap.extend(tmp_path / "fit", None, tmp_path / "out", method="expo")
    assert not (tmp_path / "out").exists()
    with pytest.raises(NextrapError, match="--methods nope"):
        nextrap.fit(trajectory, out=tmp_path / "fit2", methods=("nope",))


@pytest.mark.parametrize("spare", [0, 1])
def test_the_inputs_fingerprints_are_the_files_hashed_beside_or_after_the_features(trajectory, tmp_path, monkeypatch, spare):
    """Beside the feature pass where torch leaves a core, after it where it does not: the same records."""
    import nextrap.api.fit as fit_module
    monkeypatch.setattr(fit_module, "spare_cores", lambda *args: spare)
    res = nextrap.fit(trajectory, out=tmp_path / "fit", methods=["linear"], run_backtest=False)
    man = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    files = [(entry["path"], f) for entry in man["inputs"] for f in entry["files"]]
    assert len(files) == 2 * len(man["steps"]) and "inputs" in res.seconds
    for folder, f in files:
        assert f["sha256"] == hashlib.sha256((Path(folder) / f["name"]).read_bytes()).hexdigest()


def test_svd_is_checked_for_a_lora_fit_too(trajectory, tmp_path):
    with pytest.raises(NextrapError, match="--svd foo: use exact or fast"):
        nextrap.fit(trajectory, out=tmp_path / "fit", svd="foo")
    assert not (tmp_path / "fit").exists()


def test_more_backtest_folds_than_the_trajectory_allows_are_recorded_and_warned(trajectory, tmp_path):
    from nextrap.core.errors import NextrapWarning

    with pytest.warns(NextrapWarning, match="--backtest-folds 100: the trajectory allows"):
        res = nextrap.fit(trajectory, out=tmp_path / "fit", methods=("linear",), backtest_folds=100)
    used = res.backtest[0].folds
    settings = json.loads((tmp_path / "fit" / "manifest.json").read_text())["settings"]
    assert 1 <= used < 100 and settings["backtest_folds"] == 100 and settings["backtest_folds_used"] == used


def test_a_bad_memory_size_names_the_option(trajectory, tmp_path):
    with pytest.raises(NextrapError, match="--max-memory 'abc': cannot read the size"):
        nextrap.fit(trajectory, out=tmp_path / "fit", max_memory="abc")
