import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nextrap.cli import app
from nextrap.core.errors import NextrapError
from nextrap.rl.grpo import GRPOConfig
from nextrap.io.files import write_marker
from nextrap.rl.pipeline import (WORKSPACE, Arm, PipelineConfig, PipelineResult, accuracy_at, run_pipeline, speedup,
                                 steps_to_reach)

TINY = GRPOConfig(save_every=2, batch_prompts=4, group_size=2, lora_r=4, lora_alpha=8, eval_prompts=8, eval_samples=2)


def test_rank_grown_jumps_run_with_rank_matched_controls_and_restart_alike(tmp_path):
    cfg = PipelineConfig(out=str(tmp_path / "p"), steps=16, horizon=2, epochs=3, grpo=TINY, jump_format="adapter")
    r = run_pipeline(cfg)
    assert (r.s1, r.s2) == (6, 4)
    assert [a.name for a in r.arms] == ["plain", "next-paper (alpha 1.5)", "next (alpha 1.5)", "no jump (rank of next-paper)",
                                        "no jump (rank of next)", "true future (step 10)"]
    assert r.arms[0].rl_steps == 16 and all(a.rl_steps == 10 for a in r.arms[1:])
    for arm in r.arms[1:]:
        steps = [c["step"] for c in arm.curve]
        assert steps[0] == 0 and steps[-1] == 10 and 6 in steps
    # the no-jump control is plain's step-6 adapter plus one rank like the NExt jump's, with no effect (B column
    # zero) but trainable (A row nonzero: a zero A row and B column would have zero gradients forever)
    none = load_file(str(tmp_path / "p" / "jump-none-next-paper" / "adapter_model.safetensors"))
    plain6 = load_file(str(tmp_path / "p" / "plain" / "step_6" / "adapter_model.safetensors"))
    jumped = load_file(str(tmp_path / "p" / "jump-next-paper" / "adapter_model.safetensors"))
    for k, v in plain6.items():
        assert none[k].shape == jumped[k].shape
        assert torch.equal(none[k][: v.shape[0], : v.shape[1]], v)
        extra = none[k][:, 4:] if ".lora_B." in k else none[k][4:]
        assert (extra == 0).all() if ".lora_B." in k else (extra != 0).all()
    saved = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert saved["s1"] == 6 and len(saved["arms"]) == 6 and saved["config"]["grpo"]["save_every"] == 2
    assert saved["jump_format"] == "adapter"
    # every continuation drew the same prompts: its own seed, the same for all arms
    cfgs = [json.loads((tmp_path / "p" / d / "grpo_config.json").read_text()) for d in ("cont-next", "cont-none-next", "cont-future")]
    assert len({c["seed"] for c in cfgs}) == 1 and cfgs[0]["seed"] != 0


def _state(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _grpo_config(folder):
    return json.loads((folder / "grpo_config.json").read_text())


def test_by_default_the_jump_is_folded_into_the_base_and_checkpoint_s1_itself_goes_on_as_does_its_control(tmp_path):
    """jump_format base: the jump and the no-jump control continue plain's checkpoint S1 (its adapter at rank r
    and its AdamW state) with the same prompts; they differ only in the base: W_0 + alpha * move against W_0."""
    from conftest import model_state
    from nextrap.io.checkpoints import load_trajectory
    from nextrap.rl.grpo import default_model_dir

    p = tmp_path / "p"
    r = run_pipeline(PipelineConfig(out=str(p), steps=16, horizon=2, methods=("linear",), grpo=TINY))
    assert [a.name for a in r.arms] == ["plain", "linear (alpha 1.5)", "no jump", "true future (step 10)"]
    assert r.arms[1].control == "no jump" and r.jump_format == "base"
    jump, control, future = (_grpo_config(p / d) for d in ("cont-linear", "cont-none", "cont-future"))
    assert jump["init_model"] == str(p / "jump-linear") and control["init_model"] is None and future["init_model"] is None
    assert jump["init_adapter"] == control["init_adapter"] == jump["resume_optimizer"] == control["resume_optimizer"] == str(p / "plain" / "step_6")
    assert future["init_adapter"] == future["resume_optimizer"] == str(p / "plain" / "step_10")
    assert jump["seed"] == control["seed"] == future["seed"] != 0 and jump["lora_r"] == control["lora_r"] == 4
    s1 = _state(p / "plain" / "step_6")
    for d in ("cont-linear", "cont-none"):  # the continuations start from checkpoint S1 itself, rank 4
        assert all(torch.equal(v, s1[k]) for k, v in _state(p / d / "step_0").items())
    # the folded base: W_0 + 1.5 (W_6 - W_2) (linear, h = 2 checkpoints) on every LoRA weight, the rest untouched
    traj = load_trajectory(p / "prefix")
    w0, base = model_state(default_model_dir()), model_state(p / "jump-linear")
    for m in traj.modules:
        (b6, a6), (b2, a2) = traj.factors(3, [m.name]), traj.factors(1, [m.name])
        move = m.scale * (b6[0] @ a6[0] - b2[0] @ a2[0])
        assert torch.allclose(base[m.base_key].double(), w0[m.base_key].double() + 1.5 * move, atol=1e-6)
    assert all(torch.equal(base[k], v) for k, v in w0.items() if k not in {m.base_key for m in traj.modules})
    saved = json.loads((p / "pipeline.json").read_text())
    assert saved["jump_format"] == "base" and saved["config"]["jump_format"] == "base"


def test_repeated_jump_schedules_and_alpha_by_reward_are_arms_whose_jump_time_counts(tmp_path):
    p = tmp_path / "p"
    grpo = replace(TINY, select_prompts=16, eval_samples=1)
    with pytest.raises(NextrapError, match="--select-prompts"):
        run_pipeline(PipelineConfig(out=str(p), steps=16, horizon=1, methods=("linear",), grpo=TINY, reward_alphas=(0.5, 1.5)))
    with pytest.raises(NextrapError, match="--schedules 5"):
        run_pipeline(PipelineConfig(out=str(p), steps=16, horizon=1, methods=("linear",), grpo=TINY, schedules=(5,)))
    r = run_pipeline(PipelineConfig(out=str(p), steps=16, horizon=1, methods=("linear",), grpo=grpo, reward_alphas=(0.5, 1.5),
                                    schedules=(4,)))
    names = [a.name for a in r.arms]
    assert names == ["plain", "linear (alpha 1.5)", "linear (alpha by reward)", "no jump", "true future (step 8)",
                     "linear every 4 (alpha 1.5)"]
    reward, every = r.arms[2], r.arms[5]
    assert reward.note.startswith("chose alpha ") and "by reward (0.5: " in reward.note and reward.control == "no jump"
    assert _grpo_config(p / "cont-linear-reward")["init_model"] == str(p / "jump-linear-reward")
    assert json.loads((p / "jump-linear-reward" / "nextrap.json").read_text())["alpha"] in (0.5, 1.5)
    # the schedule: S1 + S2 steps from the start, jumping in place at 4 and 8, its jump time counted in its cost
    assert every.rl_steps == 10 and every.control == "plain" and every.note == "jumped at 4: alpha 1.5, 8: alpha 1.5"
    rows = [json.loads(line) for line in (p / "cont-every4-linear" / "metrics.jsonl").read_text().splitlines()]
    assert every.jump_seconds > 0 and every.jump_seconds == pytest.approx(sum(row["jump"]["seconds"] for row in rows if "jump" in row))
    assert (p / "cont-every4-linear" / "nextrap-jumps" / "step_8" / "jump.json").is_file()
    plain = [json.loads(line) for line in (p / "plain" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda row: {k: v for k, v in row.items() if k not in ("seconds_per_step", "jump")}  # noqa: E731
    assert [strip(x) for x in rows[:5]] == [strip(x) for x in plain[:5]]  # plain itself until its first jump
    assert all(torch.equal(v, _state(p / "plain" / "step_4")[k]) for k, v in _state(p / "cont-every4-linear" / "step_4").items())
    per_step = r.arms[0].train_seconds / r.arms[0].rl_steps
    for arm in (reward, every):
        assert speedup(r.arms[0], arm).cost_steps == pytest.approx(arm.rl_steps + arm.jump_seconds / per_step)


def test_schedule_errors(tmp_path):
    with pytest.raises(NextrapError, match="--methods"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "m"), steps=16, horizon=2, methods=("magic",), grpo=TINY))
    with pytest.raises(NextrapError, match="multiple of --save-every"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "a"), steps=16, s1=5, horizon=2, grpo=TINY))
    with pytest.raises(NextrapError, match="at least --horizon \\+ 1"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "b"), steps=16, s1=4, horizon=2, grpo=TINY))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_accuracy_lookup_and_steps_to_reach():
    arm = Arm("x", 40, [{"step": 0, "eval_sampled_acc": 0.1}, {"step": 20, "eval_sampled_acc": 0.3},
                        {"step": 40, "eval_sampled_acc": 0.5}], 0.0)
    assert accuracy_at(arm, 20) == 0.3 and accuracy_at(arm, 10) is None
    assert steps_to_reach(arm, 0.4) == pytest.approx(30.0)
    assert steps_to_reach(arm, 0.05) == 0.0 and steps_to_reach(arm, 0.6) is None


def test_speedup_is_plains_equivalent_steps_over_the_steps_paid_fit_time_included():
    plain = Arm("plain", 400, [{"step": 0, "eval_sampled_acc": 0.2}, {"step": 200, "eval_sampled_acc": 0.3},
                               {"step": 400, "eval_sampled_acc": 0.4}], train_seconds=200.0)  # 0.5 s per step
    jumped = Arm("linear", 250, [{"step": 250, "eval_sampled_acc": 0.35}], 125.0, jump_seconds=25.0)
    sp = speedup(plain, jumped)
    assert sp.equivalent_plain_steps == pytest.approx(300.0)  # plain reaches 0.35 halfway from 200 to 400
    assert sp.cost_steps == pytest.approx(250 + 50)  # 25 s of fit + extend = 50 plain steps
    assert sp.speedup == pytest.approx(1.0)
    beyond = speedup(plain, Arm("x", 250, [{"step": 250, "eval_sampled_acc": 0.5}], 125.0))
    assert beyond.equivalent_plain_steps is None and beyond.speedup is None  # better than plain ever got: no number
    assert speedup(plain, plain).speedup == pytest.approx(1.0)


def test_cli_pipeline_json(tmp_path):
    res = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "p"), "--steps", "12", "--save-every", "2",
                                   "--horizon", "2", "--s1", "6", "--s2", "2", "--epochs", "2", "--batch-prompts", "8",
                                   "--group-size", "4", "--lora-r", "2", "--eval-prompts", "4", "--eval-samples", "1",
                                   "--methods", "linear", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["s1"] == 6 and [a["name"] for a in out["arms"]] == ["plain", "linear (alpha 1.5)", "no jump", "true future (step 10)"]
    assert out["arms"][1]["control"] == "no jump" and out["jump_format"] == "base"
    assert all("equivalent_plain_steps" in a and "speedup" in a and a["cost_steps"] >= a["rl_steps"] for a in out["arms"])
    for args, message in ((["--schedules", "every"], "--schedules every"), (["--alpha-by-reward", "1,2"], "--select-prompts"),
                          (["--jump-format", "lora"], "--jump-format lora")):
        res = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "q"), "--steps", "12", "--save-every", "2", *args])
        assert res.exit_code == 1 and message in res.stderr and not (tmp_path / "q").exists()


def test_rank_matched_controls_auto_alpha_and_a_reused_plain_run(tmp_path):
    """Jumps of different adapter shapes each get a control of their shape; --alpha auto records its choice;
    a finished plain run is reused (not retrained) and one with other settings is refused."""
    first = run_pipeline(PipelineConfig(out=str(tmp_path / "a"), steps=16, horizon=2, epochs=2, methods=("linear",), grpo=TINY,
                                        jump_format="adapter"))
    plain = tmp_path / "a" / "plain"
    with pytest.raises(NextrapError, match="--alpha auto: the backtest needs 2 x --horizon"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "x"), steps=16, horizon=2, alpha=None, grpo=TINY, plain_from=str(plain)))
    cfg = PipelineConfig(out=str(tmp_path / "b"), steps=16, s1=10, s2=4, horizon=2, epochs=2, alpha=None, methods=("next-paper", "linear"),
                         grpo=TINY, plain_from=str(plain), jump_format="adapter")
    r = run_pipeline(cfg)
    assert (tmp_path / "b" / "plain").resolve() == plain.resolve()
    assert r.arms[0].curve == first.arms[0].curve
    names = [a.name for a in r.arms]
    assert names == ["plain", "next-paper (alpha auto)", "linear (alpha auto)", "no jump (rank of next-paper)",
                     "no jump (rank of linear)", "true future (step 14)"]
    assert r.arms[1].control == "no jump (rank of next-paper)" and r.arms[2].control == "no jump (rank of linear)"
    assert all(a.note.startswith("chose alpha") for a in r.arms[1:3])
    for method in ("next-paper", "linear"):
        jump = load_file(str(tmp_path / "b" / f"jump-{method}" / "adapter_model.safetensors"))
        control = load_file(str(tmp_path / "b" / f"jump-none-{method}" / "adapter_model.safetensors"))
        assert {k: v.shape for k, v in jump.items()} == {k: v.shape for k, v in control.items()}
    with pytest.raises(NextrapError, match="lr = 0.0001, but this pipeline uses 0.001"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "c"), steps=16, horizon=2, grpo=replace(TINY, lr=1e-3), plain_from=str(plain)))
    continued = tmp_path / "continued"
    continued.mkdir()
    saved = json.loads((plain / "grpo_config.json").read_text())
    (continued / "grpo_config.json").write_text(json.dumps({**saved, "init_adapter": str(plain / "step_8")}))
    with pytest.raises(NextrapError, match="init_adapter .*a continued run"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "e"), steps=16, horizon=2, grpo=TINY, plain_from=str(continued)))
    with pytest.raises(NextrapError, match="fewer than --steps 20"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "d"), steps=20, horizon=2, grpo=TINY, plain_from=str(plain)))
    # a run from before an option existed is the option's default (its keys are compared before its steps)
    older = tmp_path / "older"
    older.mkdir()
    (older / "grpo_config.json").write_text(json.dumps({k: v for k, v in saved.items() if not k.startswith(("jump_", "select_"))}))
    with pytest.raises(NextrapError, match="fewer than --steps 20"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "f"), steps=20, horizon=2, grpo=TINY, plain_from=str(older)))


def test_overwrite_never_deletes_the_plain_run_it_reuses(tmp_path):
    ws, plain = tmp_path / "ws", tmp_path / "ws" / "plain"
    (plain / "step_16").mkdir(parents=True)
    saved = {**json.loads(json.dumps(asdict(TINY))), "steps": 16, "target_modules": sorted(TINY.target_modules)}
    (plain / "grpo_config.json").write_text(json.dumps(saved))
    write_marker(ws, "pipeline", trees=WORKSPACE)  # a pipeline's workspace: --overwrite may replace it, not its input
    with pytest.raises(NextrapError, match=f"--out {ws}: holds --plain-from {plain}"):
        run_pipeline(PipelineConfig(out=str(ws), steps=16, horizon=2, grpo=TINY, plain_from=str(plain)), overwrite=True)
    assert (plain / "grpo_config.json").is_file() and (plain / "step_16").is_dir()


def _canned_run(monkeypatch, out):
    """Replace the (long) run by a finished one; the runs it was asked for are listed."""
    import nextrap.rl.pipeline as pipeline
    curve = [{"step": 0, "eval_greedy_acc": 0.2, "eval_sampled_acc": 0.1}, {"step": 4, "eval_greedy_acc": 0.5, "eval_sampled_acc": 0.4}]
    result = PipelineResult(out, 4, 2, 2, 1, 1.5, [Arm("plain", 4, curve, 2.0)], [])
    calls = []

    def run(cfg, progress=None, overwrite=False):
        calls.append(cfg)
        out.mkdir(exist_ok=True)
        return result
    monkeypatch.setattr(pipeline, "run_pipeline", run)
    return calls


def test_a_plot_into_a_missing_folder_is_refused_before_the_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p"
    calls = _canned_run(monkeypatch, out)
    res = CliRunner().invoke(app, ["pipeline", "--out", str(out), "--plot", str(tmp_path / "nope" / "a.png"), "--json"])
    assert res.exit_code == 1 and f"folder {tmp_path / 'nope'} does not exist" in res.stderr and calls == []
    # inside the workspace, which --overwrite replaces whole (only what the pipeline marked): refused too
    res = CliRunner().invoke(app, ["pipeline", "--out", str(out), "--plot", str(out / "a.png"), "--json"])
    assert res.exit_code == 1 and "inside the workspace" in res.stderr and calls == []
    # a name without a suffix is the .png matplotlib writes, and the path printed is that file
    res = CliRunner().invoke(app, ["pipeline", "--out", str(out), "--plot", str(tmp_path / "acc")])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and (tmp_path / "acc.png").is_file() and f"plot written to {tmp_path / 'acc.png'}" in res.stdout


def test_a_plot_that_fails_after_the_run_is_a_warning_and_the_results_are_still_printed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    _canned_run(monkeypatch, tmp_path / "p")
    args = ["pipeline", "--out", str(tmp_path / "p"), "--plot", str(tmp_path / "a.xyz")]  # a type matplotlib cannot write
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 4
    assert "warning:" in res.stderr and f"--plot {tmp_path / 'a.xyz'}: not written" in res.stderr
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "train -> jump -> train" in res.stdout and "plot written" not in res.stdout
