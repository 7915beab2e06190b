"""Real TRL (GRPOTrainer + PEFT LoRA, CPU) on the embedded default model: a run resumed on the base with the
jump folded in (``extend --format base``) continues at step c + 1 with its own optimizer and schedule, on the
jumped weights. The recipe is ``examples/trl_resume.py``, imported here so that the test runs what the README shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]'; `make test` installs it)")

from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from conftest import model_state  # noqa: E402
from nextrap.io.checkpoints import relative_name  # noqa: E402
from nextrap.rl.grpo import default_model_dir  # noqa: E402

_spec = importlib.util.spec_from_file_location("trl_resume", Path(__file__).resolve().parents[1] / "examples" / "trl_resume.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

STEPS, C = 6, 4  # the run's schedule is 6 steps; it is stopped after checkpoint 4 and jumps from there
ALPHA = 1.0


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA layer's W = base_layer.weight + scaling * B @ A, by its name in the base model."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and "default" in getattr(module, "lora_A", {}):
            b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
            key = relative_name(name) + ".weight"
            out[key] = (module.base_layer.weight.double() + module.scaling["default"] * (b.double() @ a.double())).detach()
    return out


class Probe(TrainerCallback):
    """What the resumed trainer holds after loading the checkpoint and before its first step."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.step = state.global_step
        self.optimizer = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in optimizer.state_dict()["state"].items()}
        self.scheduler = lr_scheduler.state_dict()
        self.weights = effective_weights(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.first_step = getattr(self, "first_step", state.global_step)


def lora_product(folder: Path) -> dict[str, torch.Tensor]:
    """s * B @ A per LoRA-targeted weight of a saved adapter (by its name in the base model)."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    lora = recipe.lora_config()
    scale = lora.lora_alpha / lora.r
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[relative_name(key.split(".lora_A.")[0]) + ".weight"] = scale * (b.double() @ a.double())
    return out


def test_a_trl_run_resumes_on_the_folded_base_at_step_c_plus_1_with_its_optimizer_and_schedule(tmp_path):
    base, run = default_model_dir(), tmp_path / "run"
    first = recipe.make_trainer(base, run, STEPS, [recipe.StopAfter(C)])
    first.train()
    assert first.state.global_step == C and (run / f"checkpoint-{C}" / "optimizer.pt").is_file()

    res = recipe.jump(run, base, tmp_path, method="linear", alphas=[ALPHA], horizon=1)
    ckpt = run / f"checkpoint-{C}"
    assert res.resume_from == {"path": str(ckpt.absolute()), "step": C}

    probe = Probe()
    resumed = recipe.make_trainer(res.out, run, STEPS, [probe])
    resumed.train(resume_from_checkpoint=res.resume_from["path"])

    # the step count continues: loaded at c, first step c + 1, the run's schedule finished
    assert probe.step == C and probe.first_step == C + 1 and resumed.state.global_step == STEPS
    # AdamW's moments and step counts are the checkpoint's, before the first new step
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert saved and set(saved) == set(probe.optimizer)
    for i, state in saved.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(probe.optimizer[i][k], state[k]), (i, k)
    # the learning-rate schedule continues (linear decay over the whole run), not restarted
    assert probe.scheduler["last_epoch"] == C
    assert probe.scheduler == torch.load(ckpt / "scheduler.pt", weights_only=True)
    lr = {h["step"]: h["learning_rate"] for h in resumed.state.log_history if "learning_rate" in h}
    assert lr[C + 1] == pytest.approx(1e-3 * (1 - C / STEPS))
    # the weights trained on are the folded base + adapter c = W_c + alpha (W_c - W_{c-1}) (linear, horizon 1)
    w0, folded = model_state(base), model_state(res.out)
    now, before = lora_product(ckpt), lora_product(run / f"checkpoint-{C - 1}")
    assert set(probe.weights) == set(now) and now
    for key, w in probe.weights.items():
        assert torch.allclose(w, folded[key].double() + now[key], atol=1e-6), key
        jumped = w0[key].double() + now[key] + ALPHA * (now[key] - before[key])
        assert torch.allclose(w, jumped, atol=1e-6), key
        assert not torch.allclose(w, w0[key].double() + now[key], atol=1e-6), key  # the jump is really in


def test_the_callback_jumps_a_live_trl_run_twice_in_place_and_fold_gives_the_base_its_later_checkpoints_load_on(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nextrap.integrations.trl import JumpCallback
    from nextrap.api.jumps import JUMPS, fold

    base, run = default_model_dir(), tmp_path / "run"
    jumper = JumpCallback(steps=[3, 5], method="linear", alpha=ALPHA, horizon=1)
    trainer = recipe.make_trainer(base, run, STEPS, [jumper])
    trainer.train()

    assert trainer.state.global_step == STEPS  # the run went on after each jump, same trainer, same optimizer
    assert [(r["step"], r["method"], r["alpha"]) for r in jumper.history] == [(3, "linear", ALPHA), (5, "linear", ALPHA)]
    # the second jump is fitted on the checkpoints saved since the first (they share one base)
    assert [r["fitted_steps"] for r in jumper.history] == [[1, 2, 3], [3, 4, 5]]
    assert [r["saved"] for r in jumper.history] == [str(run / JUMPS / f"step_{s}") for s in (3, 5)]
    # the frozen base weights moved by alpha (W_3 - W_2) at step 3 and alpha (W_5 - W_4) at step 5, computed
    # from the saved checkpoints (each adapter relative to the base it was trained on)
    w0 = model_state(base)
    sba = {s: lora_product(run / f"checkpoint-{s}") for s in (2, 3, 4, 5)}
    live = {relative_name(n) + ".weight": m for n, m in trainer.model.named_modules() if hasattr(m, "base_layer")}
    assert set(live) == set(sba[3])
    for key, layer in live.items():
        expected = w0[key].double() + ALPHA * (sba[3][key] - sba[2][key]) + ALPHA * (sba[5][key] - sba[4][key])
        assert torch.allclose(layer.base_layer.weight.double(), expected, atol=1e-6), key
    # fold gives that base bit for bit, and the last checkpoint (saved after both jumps) on it is the live model
    folded = fold(base, run / JUMPS, tmp_path / "folded").out
    folded_state = model_state(folded)
    for key, layer in live.items():
        assert torch.equal(layer.base_layer.weight, folded_state[key]), key
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folded), run / f"checkpoint-{STEPS}")
    mine, theirs = effective_weights(trainer.model), effective_weights(reloaded)
    assert mine.keys() == theirs.keys()
    for key, w in mine.items():
        assert torch.allclose(theirs[key], w, atol=1e-7), key


def test_the_callback_refuses_steps_without_a_checkpoint_before_training():
    from types import SimpleNamespace

    from nextrap.core.errors import NextrapError
    from nextrap.integrations.trl import JumpCallback

    args = SimpleNamespace(save_strategy="steps", save_steps=10)
    JumpCallback(steps=[20, 150]).on_train_begin(args, None, None)
    with pytest.raises(NextrapError, match=r"steps \[15\]: the trainer saves every 10 steps"):
        JumpCallback(steps=[15, 20]).on_train_begin(args, None, None)
