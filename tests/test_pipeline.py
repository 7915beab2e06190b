import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nextrap.cli import app
from nextrap.errors import NextrapError
from nextrap.grpo import GRPOConfig
from nextrap.pipeline import Arm, PipelineConfig, accuracy_at, run_pipeline, speedup, steps_to_reach

TINY = GRPOConfig(save_every=2, batch_prompts=4, group_size=2, lora_r=4, lora_alpha=8, eval_prompts=8, eval_samples=2)


def test_every_arm_runs_and_restarts_alike(tmp_path):
    cfg = PipelineConfig(out=str(tmp_path / "p"), steps=16, horizon=2, epochs=3, grpo=TINY)
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
    # every continuation drew the same prompts: its own seed, the same for all arms
    cfgs = [json.loads((tmp_path / "p" / d / "grpo_config.json").read_text()) for d in ("cont-next", "cont-none-next", "cont-future")]
    assert len({c["seed"] for c in cfgs}) == 1 and cfgs[0]["seed"] != 0


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
    assert out["arms"][1]["control"] == "no jump"
    assert all("equivalent_plain_steps" in a and "speedup" in a and a["cost_steps"] >= a["rl_steps"] for a in out["arms"])


def test_rank_matched_controls_auto_alpha_and_a_reused_plain_run(tmp_path):
    """Jumps of different adapter shapes each get a control of their shape; --alpha auto records its choice;
    a finished plain run is reused (not retrained) and one with other settings is refused."""
    first = run_pipeline(PipelineConfig(out=str(tmp_path / "a"), steps=16, horizon=2, epochs=2, methods=("linear",), grpo=TINY))
    plain = tmp_path / "a" / "plain"
    with pytest.raises(NextrapError, match="--alpha auto: the backtest needs 2 x --horizon"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "x"), steps=16, horizon=2, alpha=None, grpo=TINY, plain_from=str(plain)))
    cfg = PipelineConfig(out=str(tmp_path / "b"), steps=16, s1=10, s2=4, horizon=2, epochs=2, alpha=None, methods=("next-paper", "linear"),
                         grpo=TINY, plain_from=str(plain))
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
