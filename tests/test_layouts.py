"""Every trainer layout of ``fixtures/layouts`` (see fixtures/make_layout_fixtures.py) is read without flags and
gives the features of the same steps of the plain PEFT trajectory, up to its storage dtype."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import FIXTURES, TRAJECTORY
from nextrap.io.checkpoints import LATEST_ITERATION, discover, latest_iteration, load_trajectory
from nextrap.cli import app
from nextrap.core.errors import NextrapError
from nextrap.engine.lorafeatures import compute_features

LAYOUTS = FIXTURES / "layouts"
STEPS = [0, 20, 40, 60, 80]
H = 2
# layout -> (root, trainer reported by inspect, storage dtype, sigma relative tolerance, direction tolerance)
CASES = {
    "peft": (None, "peft", "float32", 1e-6, 1e-6),  # features are stored in float32
    "trl": (LAYOUTS / "trl", "trl", "float32", 1e-6, 1e-6),
    "verl": (LAYOUTS / "verl", "verl", "bfloat16", 1e-2, 1e-2),
    "openrlhf": (LAYOUTS / "openrlhf", "openrlhf", "float16", 1e-3, 1e-3),
}
runner = CliRunner()


@pytest.fixture(scope="module")
def peft_root(tmp_path_factory) -> Path:
    """The plain PEFT trajectory restricted to the layouts' steps."""
    root = tmp_path_factory.mktemp("peft")
    for step in STEPS:
        shutil.copytree(TRAJECTORY / f"step_{step}", root / f"step_{step}")
    return root


@pytest.fixture(scope="module")
def reference(peft_root):
    return compute_features(load_trajectory(peft_root), H)


def _root(layout: str, peft_root: Path) -> Path:
    return CASES[layout][0] or peft_root


def _copy(layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(LAYOUTS / layout, tmp_path / layout))


@pytest.mark.parametrize("layout", CASES)
def test_discovery_finds_the_steps_without_flags(layout, peft_root):
    ckpts = discover(_root(layout, peft_root))
    assert [c.step for c in ckpts] == STEPS
    weights = {"openrlhf": "adapter_model.bin"}.get(layout, "adapter_model.safetensors")
    assert all(c.weights.name == weights for c in ckpts)
    assert all(c.path != LAYOUTS / layout for c in ckpts)  # TRL's final save_model at the root has no step


@pytest.mark.parametrize("layout", CASES)
def test_features_match_the_peft_trajectory(layout, peft_root, reference):
    _, _, _, rtol, dtol = CASES[layout]
    feats = compute_features(load_trajectory(_root(layout, peft_root)), H)
    assert feats.steps == reference.steps and feats.modules == reference.modules and len(feats.modules) == 14
    for module in reference.modules:
        for kind in ("global", "local", "target"):
            sigma_ref, sigma = reference.get(module, kind, "sigma"), feats.get(module, kind, "sigma")
            assert torch.equal(sigma.isnan(), sigma_ref.isnan())
            rows = sigma_ref > 1e-6 * sigma_ref.nan_to_num().max()  # zero deltas (step 0) have no direction
            torch.testing.assert_close(sigma[rows], sigma_ref[rows], rtol=rtol, atol=0)
            for part in ("u", "v"):
                cos = (feats.get(module, kind, part)[rows] * reference.get(module, kind, part)[rows]).sum(-1)
                assert (cos > 1 - dtol).all(), (module, kind, part, cos.min())  # same direction and sign


@pytest.mark.parametrize("layout", ["trl", "verl", "openrlhf"])
def test_inspect_json_reports_the_layout(layout):
    res = runner.invoke(app, ["inspect", str(LAYOUTS / layout), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    _, trainer, dtype, _, _ = CASES[layout]
    assert (out["layout"], out["trainer"], out["steps"], out["dtypes"]) == ("peft-lora", trainer, STEPS, [dtype])


def test_trl_step_comes_from_trainer_state(tmp_path):
    root = _copy("trl", tmp_path)
    for step in STEPS:  # folders renamed by hand: trainer_state.json still tells the step and the trainer
        (root / f"checkpoint-{step}").rename(root / f"run-{chr(ord('a') + step // 20)}")
    traj = load_trajectory(root)
    assert traj.steps == STEPS and traj.checkpoints[1].path.name == "run-b"
    res = runner.invoke(app, ["inspect", str(root), "--json"])
    assert json.loads(res.stdout)["trainer"] == "trl"


def test_verl_partial_save_past_latest_iteration_is_ignored(tmp_path):
    root = _copy("verl", tmp_path)
    assert (root / "global_step_100" / "actor" / "lora_adapter" / "adapter_config.json").is_file()
    assert latest_iteration(root) == 80 and discover(root)[-1].step == 80
    (root / LATEST_ITERATION).unlink()  # without verl's marker the partial save is read, and is broken
    with pytest.raises(NextrapError, match="global_step_100.*no adapter_model.safetensors"):
        discover(root)


def test_verl_latest_step_missing_is_an_error(tmp_path):
    root = _copy("verl", tmp_path)
    shutil.rmtree(root / "global_step_80")
    with pytest.raises(NextrapError) as err:
        discover(root)
    assert str(root / LATEST_ITERATION) in str(err.value) and "no checkpoint of step 80" in str(err.value)


@pytest.mark.parametrize("text", ["", "global_step_80", "-20", "8.0", "\x00\x01"])
def test_bad_latest_iteration_file_is_a_one_line_error(tmp_path, text):
    root = _copy("verl", tmp_path)
    (root / LATEST_ITERATION).write_text(text)
    with pytest.raises(NextrapError) as err:
        discover(root)
    message = str(err.value)
    assert message.startswith(str(root / LATEST_ITERATION)) and "not a step number" in message and "\n" not in message
    (root / LATEST_ITERATION).write_text(" 60\n")  # verl writes no newline; tolerate one
    assert latest_iteration(root) == 60 and discover(root)[-1].step == 60


def test_openrlhf_adapters_named_global_stepN(tmp_path):
    root = _copy("openrlhf", tmp_path)
    shutil.rmtree(root / "_actor")
    for step in STEPS:
        (root / f"global_step{step}_hf").rename(root / f"global_step{step}")
    assert [c.step for c in discover(root)] == STEPS
    assert json.loads(runner.invoke(app, ["inspect", str(root), "--json"]).stdout)["trainer"] == "openrlhf"


class _Payload:
    """Unpickling this creates ``path``: proof that a file was unpickled beyond tensors."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_openrlhf_bin_is_read_weights_only(tmp_path):
    root = _copy("openrlhf", tmp_path)
    marker = tmp_path / "executed"
    weights = root / "global_step40_hf" / "adapter_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, weights)
    with pytest.raises(NextrapError) as err:
        load_trajectory(root)
    assert str(weights) in str(err.value) and "weights-only" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ({"base_model.model.x.lora_A.weight": {"nested": torch.zeros(2, 2)}}, "is a dict, not a tensor"),
    ([torch.zeros(2, 2)], "holds a list, not a state dict"),
])
def test_bin_without_plain_tensors_is_refused(tmp_path, content, message):
    root = _copy("openrlhf", tmp_path)
    weights = root / "global_step20_hf" / "adapter_model.bin"
    torch.save(content, weights)
    with pytest.raises(NextrapError, match=message) as err:
        load_trajectory(root)
    assert str(weights) in str(err.value)


def test_trainer_state_files_are_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    roots = [_copy(layout, tmp_path) for layout in ("trl", "verl", "openrlhf")]
    for root in roots:  # optimizer.pt, rng_state.pth, FSDP / DeepSpeed shards, data.pt, training_args.bin
        for f in root.rglob("*"):
            if f.suffix in (".pt", ".pth") or f.name == "training_args.bin":
                f.write_bytes(pickle.dumps(_Payload(marker)))
    loaded: list[tuple[str, object]] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loaded.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for root in roots:
        compute_features(load_trajectory(root), H)
    assert not marker.exists()
    assert loaded and set(loaded) == {("adapter_model.bin", True)}


def test_dora_adapters_are_refused(tmp_path):
    root = _copy("verl", tmp_path)
    config_path = root / "global_step_40" / "actor" / "lora_adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NextrapError, match="DoRA adapters are not supported") as err:
        load_trajectory(root)
    assert str(config_path) in str(err.value)
    config_path.write_text(json.dumps(config))  # a DoRA tensor without the config flag is refused too
    weights = config_path.parent / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"
    save_file({**tensors, key: torch.ones(64, dtype=torch.bfloat16)}, str(weights))
    with pytest.raises(NextrapError, match="DoRA tensors are not supported") as err:
        load_trajectory(root)
    assert str(weights) in str(err.value)
