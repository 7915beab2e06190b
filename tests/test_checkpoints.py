import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import LORA_CONFIG, TWO_MODULES, lora_tensors, write_adapter
from nextrap.io.checkpoints import LATEST_ITERATION, discover, latest_iteration, load_trajectory, module_scale
from nextrap.core.errors import NextrapError, NextrapWarning


def _traj(root: Path, names: list[str], config=LORA_CONFIG, modules=TWO_MODULES) -> Path:
    for i, name in enumerate(names):
        write_adapter(root / name, lora_tensors(i, modules), config)
    return root


@pytest.mark.parametrize("names, steps", [
    (["checkpoint-20", "checkpoint-100", "checkpoint-60"], [20, 60, 100]),
    (["global_step_10/actor/lora_adapter", "global_step_5/actor/lora_adapter"], [5, 10]),
    (["global_step10_hf", "global_step20_hf"], [10, 20]),
    (["global_step10", "global_step20"], [10, 20]),
    (["step_2", "step_1"], [1, 2]),
    (["30", "7"], [7, 30]),
])
def test_steps_come_from_folder_names_and_are_sorted(tmp_path, names, steps):
    assert [c.step for c in discover(_traj(tmp_path, names))] == steps


def test_step_from_trainer_state(tmp_path):
    _traj(tmp_path, ["run-a", "run-b"])
    (tmp_path / "run-a" / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    (tmp_path / "run-b" / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    assert [c.step for c in discover(tmp_path)] == [8, 40]


def test_unknown_step_and_duplicate_steps_are_errors(tmp_path):
    _traj(tmp_path / "a", ["final"])
    with pytest.raises(NextrapError, match="final: cannot tell its step"):
        discover(tmp_path / "a")
    _traj(tmp_path / "d", ["checkpoint-10", "checkpoint-20", "final"])  # a save beside the numbered ones
    with pytest.warns(NextrapWarning, match="final: cannot tell the step; skipped"):
        assert [c.step for c in discover(tmp_path / "d")] == [10, 20]
    _traj(tmp_path / "b", ["step_5", "checkpoint-5"])
    with pytest.raises(NextrapError, match="step 5 also found"):
        discover(tmp_path / "b")
    with pytest.raises(NextrapError, match="no PEFT adapters"):
        discover(_empty(tmp_path / "c"))


def _empty(p: Path) -> Path:
    p.mkdir()
    return p


def test_uneven_spacing_is_named(tmp_path):
    _traj(tmp_path / "a", ["step_0", "step_10", "step_15", "step_20"])
    with pytest.raises(NextrapError, match="step_15: step 15 breaks the even spacing of 10 steps"):
        discover(tmp_path / "a")
    _traj(tmp_path / "b", ["step_0", "step_10", "step_20", "step_40"])  # a missing save is not a final one
    with pytest.raises(NextrapError, match="step_40: step 40 breaks the even spacing of 10 steps"):
        discover(tmp_path / "b")


def test_off_grid_final_save_is_skipped_with_a_warning(tmp_path):
    # TRL with max_steps 35 and save_steps 10 saves checkpoint-35 too
    _traj(tmp_path, ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-35"])
    with pytest.warns(NextrapWarning, match="checkpoint-35: step 35 is off the 10-step grid .* skipped"):
        assert [c.step for c in discover(tmp_path)] == [10, 20, 30]


def test_single_adapter_is_not_a_trajectory(tmp_path):
    write_adapter(tmp_path, lora_tensors(0, TWO_MODULES), LORA_CONFIG)
    with pytest.raises(NextrapError, match="single adapter"):
        discover(tmp_path)


def test_final_adapter_beside_checkpoints_is_skipped(tmp_path):
    _traj(tmp_path, ["checkpoint-10", "checkpoint-20"])
    write_adapter(tmp_path, lora_tensors(7, TWO_MODULES), LORA_CONFIG)  # TRL's save_model(output_dir) at the end
    assert [c.path.name for c in discover(tmp_path)] == ["checkpoint-10", "checkpoint-20"]


def test_latest_iteration_drops_later_saves(tmp_path):
    _traj(tmp_path, ["global_step_10/actor/lora_adapter", "global_step_20/actor/lora_adapter", "global_step_30/actor/lora_adapter"])
    assert latest_iteration(tmp_path) is None and len(discover(tmp_path)) == 3
    (tmp_path / LATEST_ITERATION).write_text("20")
    assert [c.step for c in discover(tmp_path)] == [10, 20]


def test_fsdp_wrapper_segments_leave_module_names(tmp_path):
    wrapped = {k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v for k, v in lora_tensors(1, TWO_MODULES).items()}
    for name in ("step_1", "step_2"):
        write_adapter(tmp_path / name, wrapped, LORA_CONFIG)
    traj = load_trajectory(tmp_path)
    assert [m.name for m in traj.modules] == sorted(TWO_MODULES)
    assert traj.lora_keys("base_model.model.layers.0.q")[0] == "base_model.model.layers.0._fsdp_wrapped_module.q.lora_A.weight"


def test_trajectory_reads_modules_and_factors(tmp_path):
    traj = load_trajectory(_traj(tmp_path, ["step_1", "step_2"]))
    assert traj.steps == [1, 2]
    assert [m.name for m in traj.modules] == sorted(TWO_MODULES)
    q = traj.module("base_model.model.layers.0.q")
    assert (q.out_features, q.in_features, q.rank, q.scale) == (6, 5, 4, 2.0)
    assert q.base_key == "layers.0.q.weight"
    b, a = traj.factors(1, ["base_model.model.layers.0.q"])
    assert torch.equal(b[0].float(), lora_tensors(1, TWO_MODULES)["base_model.model.layers.0.q.lora_B.weight"])
    assert a.dtype == torch.float64


@pytest.mark.parametrize("change, message", [
    (lambda cfg, t: cfg.update(lora_alpha=16), "lora_alpha = 16"),
    (lambda cfg, t: cfg.update(use_rslora=True), "use_rslora"),
    (lambda cfg, t: t.update({"base_model.model.layers.0.q.lora_A.weight": torch.zeros(4, 7)}), "module base_model.model.layers.0.q has"),
    (lambda cfg, t: t.pop("base_model.model.layers.0.k.lora_A.weight"), "has lora_B but not its pair"),
    (lambda cfg, t: [t.pop(k) for k in list(t) if ".k." in k], "LoRA modules differ"),
])
def test_disagreeing_checkpoint_is_named(tmp_path, change, message):
    _traj(tmp_path, ["step_1", "step_2"])
    cfg, tensors = dict(LORA_CONFIG), lora_tensors(9, TWO_MODULES)
    change(cfg, tensors)
    shutil.rmtree(tmp_path / "step_3", ignore_errors=True)
    write_adapter(tmp_path / "step_3", tensors, cfg)
    with pytest.raises(NextrapError) as err:
        load_trajectory(tmp_path)
    assert "step_3" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("config, message", [
    ({**LORA_CONFIG, "use_dora": True}, "DoRA"),
    ({**LORA_CONFIG, "peft_type": "LOHA"}, "LOHA is not supported"),
])
def test_unsupported_adapters_are_refused(tmp_path, config, message):
    _traj(tmp_path, ["step_1", "step_2"], config=config)
    with pytest.raises(NextrapError, match=message):
        load_trajectory(tmp_path)


def test_rank_pattern_alpha_pattern_and_rslora_scales(tmp_path):
    modules = {"base_model.model.layers.0.q": (6, 5, 2), "base_model.model.layers.0.k": (3, 5, 4),
               "base_model.model.layers.10.q": (6, 5, 4)}
    cfg = {**LORA_CONFIG, "rank_pattern": {"layers.0.q": 2}, "alpha_pattern": {"layers.0.q": 4}}
    traj = load_trajectory(_traj(tmp_path / "a", ["step_1", "step_2"], config=cfg, modules=modules))
    assert traj.module("base_model.model.layers.0.q").scale == 4 / 2
    assert traj.module("base_model.model.layers.10.q").scale == 8 / 4  # "layers.0.q" must not match layers.10.q
    assert traj.module("base_model.model.layers.0.k").scale == 8 / 4
    assert module_scale({**LORA_CONFIG, "use_rslora": True}, "x", 4) == 8 / math.sqrt(4)


def test_corrupt_safetensors_is_a_one_line_error(tmp_path):
    _traj(tmp_path, ["step_1", "step_2"])
    weights = tmp_path / "step_2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # truncated
    with pytest.raises(NextrapError) as err:
        load_trajectory(tmp_path).factors(1, ["base_model.model.layers.0.q"])
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("broken", ["step_3", "step_1"])
def test_adapter_weights_without_their_config_are_an_error_naming_the_folder(tmp_path, broken):
    _traj(tmp_path, ["step_0", "step_1", "step_2", "step_3"])
    (tmp_path / broken / "adapter_config.json").unlink()
    with pytest.raises(NextrapError, match=rf"{broken}: has adapter_model.safetensors but no adapter_config.json"):
        discover(tmp_path)


def test_integer_lora_factors_are_refused(tmp_path):
    tensors = lora_tensors(0, TWO_MODULES)
    key = "base_model.model.layers.0.q.lora_B.weight"
    tensors[key] = tensors[key].to(torch.int32)
    write_adapter(tmp_path / "step_1", tensors, LORA_CONFIG)
    write_adapter(tmp_path / "step_2", lora_tensors(1, TWO_MODULES), LORA_CONFIG)
    with pytest.raises(NextrapError, match=rf"step_1/adapter_model.safetensors: {key} is not stored as floats"):
        load_trajectory(tmp_path)


def test_nextraps_own_outputs_inside_a_run_folder_are_not_checkpoints(tmp_path):
    from nextrap.io.files import OUTPUT_MARKER

    _traj(tmp_path, ["step_1", "step_2"])
    jumped = write_adapter(tmp_path / "jumped", lora_tensors(5, TWO_MODULES), LORA_CONFIG)
    (jumped / OUTPUT_MARKER).write_text("{}")
    assert [c.step for c in discover(tmp_path)] == [1, 2]


def test_a_marked_training_run_below_the_root_is_still_a_trajectory(tmp_path):
    """``nextrap grpo`` marks its run folder (so that --overwrite may replace it): its checkpoints stay readable
    from a folder above it, unlike a fit or a jumped adapter."""
    from nextrap.io.files import RUN_KIND, write_marker

    run = _traj(tmp_path / "runs" / "r1", ["step_1", "step_2"])
    write_marker(run, RUN_KIND, trees=("step_*",))
    assert [c.step for c in discover(tmp_path / "runs")] == [1, 2]
    write_marker(run, "fit")
    with pytest.raises(NextrapError, match="no PEFT adapters"):
        discover(tmp_path / "runs")


def test_factors_stored_as_the_stacks_are_read_straight_into_them_and_equal_the_safetensors_read(tmp_path, monkeypatch):
    from nextrap.io import tensorfile
    traj = load_trajectory(_traj(tmp_path / "run", ["step_1", "step_2"]))
    names = [m.name for m in traj.modules[:1]]
    direct: list[str] = []
    real = tensorfile.TensorFile.read_into
    monkeypatch.setattr(tensorfile.TensorFile, "read_into", lambda self, key, out: (direct.append(key), real(self, key, out))[1])
    b32, a32 = traj.factors(1, names, torch.float32)  # stored float32: read into the stacks
    assert sorted(direct) == sorted(traj.lora_keys(names[0]))
    direct.clear()
    b64, a64 = traj.factors(1, names, torch.float64)  # a conversion: through safe_open
    assert direct == []
    a_key, b_key = traj.lora_keys(names[0])
    saved = lora_tensors(1, TWO_MODULES)
    assert torch.equal(b32[0], saved[b_key]) and torch.equal(a32[0], saved[a_key])
    assert torch.equal(b64[0], saved[b_key].double()) and torch.equal(a64[0], saved[a_key].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_with_a_nan_are_refused_naming_the_file_on_either_read(tmp_path, dtype):
    root = _traj(tmp_path / "run", ["step_1"])
    tensors = lora_tensors(2, TWO_MODULES)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    write_adapter(root / "step_2", tensors, LORA_CONFIG)
    traj = load_trajectory(root)
    module = next(m.name for m in traj.modules if traj.lora_keys(m.name)[1] == key)
    with pytest.raises(NextrapError, match=r"step_2/adapter_model\.safetensors: LoRA factors contain NaN or Inf"):
        traj.factors(1, [module], dtype)


@pytest.mark.parametrize("change, message", [
    ({"init_lora_weights": "pissa"}, r"init_lora_weights = 'pissa' \(PiSSA\) rewrites the base weight.*path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "pissa_niter_4"}, r"\(PiSSA\) rewrites the base weight"),
    ({"init_lora_weights": "olora"}, r"\(OLoRA\) rewrites the base weight.*path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "corda"}, r"\(CorDA\) rewrites the base weight"),
    ({"init_lora_weights": "lora_ga"}, r"\(LoRA-GA\) rewrites the base weight"),
    ({"init_lora_weights": "loftq"}, r"\(LoftQ\) replaces the base weight"),
    ({"init_lora_weights": "someday"}, r"init_lora_weights = 'someday' is not an initialization nextrap knows"),
    ({"alora_invocation_tokens": [5, 6]}, r"aLoRA \(activated LoRA\) adapters are not supported \(alora_invocation_tokens is set"),
    ({"use_qalora": True}, r"QALoRA adapters are not supported"),
    ({"use_bdlora": {"nblocks": 2}}, r"BD-LoRA \(block-diagonal\) adapters are not supported"),
    ({"kasa_config": {}}, r"KaSA adapters are not supported"),  # PEFT makes {} a default sub-config: KaSA is on
    ({"velora_config": {}}, r"VeLoRA adapters are not supported"),
    ({"monteclora_config": {"n": 1}}, r"MonteCLoRA adapters are not supported"),
    ({"arrow_config": {}}, r"Arrow adapters are not supported"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, r"parameter-targeting adapters are not supported"),
    ({"layer_replication": [[0, 2], [1, 2]]}, r"layer-replicating adapters are not supported"),
])
def test_lora_variants_that_are_not_w0_plus_sba_are_refused_naming_the_config(tmp_path, change, message):
    _traj(tmp_path, ["step_1", "step_2"], config={**LORA_CONFIG, **change})
    with pytest.raises(NextrapError, match=message) as err:
        load_trajectory(tmp_path)
    assert str(tmp_path / "step_1" / "adapter_config.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_weight_alone_are_read(tmp_path, init):
    # the newer keys at their off values, as PEFT writes them; older PEFT versions write none of them
    off = {"alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "kasa_config": None,
           "velora_config": None, "monteclora_config": None, "arrow_config": None, "target_parameters": [],
           "layer_replication": None}
    traj = load_trajectory(_traj(tmp_path, ["step_1", "step_2"], config={**LORA_CONFIG, **off, "init_lora_weights": init}))
    assert traj.steps == [1, 2]


def test_a_ppo_critics_adapters_beside_the_actors_are_ignored_with_a_warning(tmp_path):
    # verl's PPO with a LoRA critic saves global_step_N/critic/lora_adapter beside actor/lora_adapter
    _traj(tmp_path, [f"global_step_{s}/{role}/lora_adapter" for s in (10, 20, 30) for role in ("actor", "critic")])
    with pytest.warns(NextrapWarning, match=r"global_step_10/critic/lora_adapter: the critic's checkpoints \(3, .*ignored"):
        found = discover(tmp_path)
    assert [(c.step, c.path.relative_to(tmp_path).parts[1]) for c in found] == [(10, "actor"), (20, "actor"), (30, "actor")]


def test_a_critic_without_an_actor_of_its_step_is_still_a_duplicate_or_a_checkpoint(tmp_path):
    _traj(tmp_path / "a", ["global_step_10/critic/lora_adapter", "global_step_10/other/lora_adapter"])
    with pytest.raises(NextrapError, match="step 10 also found"):
        discover(tmp_path / "a")
    assert [c.step for c in discover(_traj(tmp_path / "b", ["step_1/critic", "step_2/critic"]))] == [1, 2]


def test_a_truncated_bin_is_an_error_naming_the_file(tmp_path):
    modules = {"base_model.model.layers.0.q": (64, 64, 32)}  # 16 KB: torch's zip reader fails with a bare EINVAL
    folder = _traj(tmp_path, ["step_1"], modules=modules) / "step_1"
    weights = folder / "adapter_model.bin"
    torch.save(lora_tensors(0, modules), weights)
    weights.write_bytes(weights.read_bytes()[:8000])  # a copy cut short
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(NextrapError, match=rf"^{weights}: not a readable torch file, truncated or corrupt\? \(invalid argument\)$"):
        load_trajectory(tmp_path)


def test_the_run_roots_trainer_state_gives_no_step_to_a_folder_beside_the_checkpoints(tmp_path):
    from nextrap.io.checkpoints import step_from_path

    (tmp_path / "final").mkdir()
    (tmp_path / "run-a").mkdir()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 23}))  # HF Trainer's save_state at the end
    (tmp_path / "run-a" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    assert step_from_path(tmp_path / "final", tmp_path) is None
    assert step_from_path(tmp_path / "run-a", tmp_path) == 10
