import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import BASE, TRAJECTORY, model_state
from nextrap.io.checkpoints import load_trajectory
from nextrap.cli import app
from nextrap.core.errors import NextrapError
from nextrap.api.extend import plan
from nextrap.api.fit import load_fit
from nextrap.rl.grpo import default_model_dir
from nextrap.api.jumps import apply_in_place, choose_by_score, fold, load_jumps, parse_jump_alpha, save_jump


@pytest.fixture(scope="module")
def moves(fitted):
    """Two different moves of the fixture trajectory (linear and expo), as a run would have jumped them."""
    fit = load_fit(fitted)
    return fit.trajectory.modules, plan(fit, [1.0], "linear").factored(), plan(fit, [1.0], "expo").factored()


def test_fold_adds_every_saved_jump_up_to_a_step_and_equals_the_jump_made_in_place(moves, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    modules, linear, expo = moves
    root = tmp_path / "run" / "nextrap-jumps"
    save_jump(root, 100, linear, 0.5, modules, {"checkpoint": "run/checkpoint-100"})
    save_jump(root, 160, expo, 1.5, modules, {})
    assert [j.step for j in load_jumps(root)] == [100, 160] and [j.step for j in load_jumps(root, upto=120)] == [100]

    first = fold(BASE, root, tmp_path / "upto-120", upto=120, max_shard_size="100KB")
    both = fold(BASE, root, tmp_path / "all")
    assert first.steps == [100] and first.shards > 1 and both.steps == [100, 160] and both.shards == 1
    base, one, two = model_state(BASE), model_state(first.out), model_state(both.out)
    for m in modules:
        (p1, q1), (p2, q2) = linear.factors[m.name], expo.factors[m.name]
        step1 = 0.5 * p1 @ q1.mT
        assert torch.allclose(one[m.base_key].double(), base[m.base_key].double() + step1, atol=1e-7)
        assert torch.allclose(two[m.base_key].double(), base[m.base_key].double() + step1 + 1.5 * p2 @ q2.mT, atol=1e-7)
    lora_keys = {m.base_key for m in modules}
    assert all(torch.equal(two[k], v) for k, v in base.items() if k not in lora_keys)
    info = json.loads((both.out / "nextrap.json").read_text())
    assert [f["step"] for f in info["folded"]] == [100, 160] and info["folded"][0]["alpha"] == 0.5

    # the jump made in place on a live PEFT model is the folded base, bit for bit
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), TRAJECTORY / "step_160")
    assert apply_in_place(model, linear, 0.5, modules) == len(modules)
    live = {n: mod for n, mod in model.named_modules()}
    for m in modules:
        assert torch.equal(live[m.name].base_layer.weight, one[m.base_key]), m.name


def test_fold_cli_and_its_errors(moves, tmp_path):
    modules, linear, _ = moves
    runner = CliRunner()
    res = runner.invoke(app, ["fold", str(BASE), str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no such folder of saved jumps" in res.stderr
    save_jump(tmp_path / "jumps", 40, linear, 1.0, modules, {})
    res = runner.invoke(app, ["fold", str(BASE), str(tmp_path / "jumps"), "--out", str(tmp_path / "o"), "--upto", "30"])
    assert res.exit_code == 1 and "no jump saved at or before step 30" in res.stderr and not (tmp_path / "o").exists()
    res = runner.invoke(app, ["fold", str(BASE), str(tmp_path / "jumps"), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == [40] and (tmp_path / "o" / "config.json").is_file()
    with pytest.raises(NextrapError, match="but the LoRA module expects"):  # a base the adapters were not trained on
        fold(default_model_dir(), tmp_path / "jumps", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_a_live_model_without_the_checkpoints_modules_is_refused(moves):
    from transformers import AutoModelForCausalLM

    modules, linear, _ = moves
    with pytest.raises(NextrapError, match="no LoRA module"):
        apply_in_place(AutoModelForCausalLM.from_pretrained(BASE), linear, 1.0, modules)
    assert load_trajectory(TRAJECTORY).modules == modules


def test_choose_by_score_tries_each_alpha_in_place_and_leaves_the_base_as_it_was(moves):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    modules, linear, _ = moves
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), TRAJECTORY / "step_160")
    layer = dict(model.named_modules())[modules[0].name].base_layer
    before = layer.weight.detach().clone()
    seen, scores = [], iter([0.2, 0.7, 0.7, 0.1])

    def score() -> float:  # what the model looks like while it is scored, and a made-up reward
        seen.append(layer.weight.detach().clone())
        return next(scores)

    best, by_alpha = choose_by_score(model, linear, [0.0, 1.0, 2.0, 3.0], modules, score)
    assert best == 1.0 and by_alpha == {0.0: 0.2, 1.0: 0.7, 2.0: 0.7, 3.0: 0.1}  # the first of equal scores
    p, q = linear.factors[modules[0].name]
    for alpha, w in zip([0.0, 1.0, 2.0, 3.0], seen):
        assert torch.allclose(w.double(), before.double() + alpha * p @ q.mT, atol=1e-6)
    assert torch.equal(layer.weight, before)  # restored bit for bit


def test_parse_jump_alpha():
    assert parse_jump_alpha("1.5") == (1.5, ()) and parse_jump_alpha("auto") == (None, ())
    assert parse_jump_alpha("reward:0.5,1.5") == (None, (0.5, 1.5))
    assert parse_jump_alpha("reward:0.5:1.5:0.5") == (None, (0.5, 1.0, 1.5))
    with pytest.raises(NextrapError, match="one alpha"):
        parse_jump_alpha("1,2")
    with pytest.raises(NextrapError, match="candidates"):
        parse_jump_alpha("reward:auto")


def test_a_jump_json_with_missing_or_wrong_fields_is_a_one_line_error(moves, tmp_path):
    modules, linear, _ = moves
    folder = save_jump(tmp_path / "jumps", 40, linear, 1.0, modules, {})
    info = json.loads((folder / "jump.json").read_text())
    for key, broken, message in (("step", None, "needs step"), ("alpha", "big", "needs alpha"),
                                 ("modules", [{"name": "q"}], "a modules entry is not a LoRA module")):
        (folder / "jump.json").write_text(json.dumps({k: v for k, v in {**info, key: broken}.items() if v is not None}))
        with pytest.raises(NextrapError, match=f"step_40/jump.json: .*{message}"):
            fold(BASE, tmp_path / "jumps", tmp_path / "o")
    res = CliRunner().invoke(app, ["fold", str(BASE), str(tmp_path / "jumps"), "--out", str(tmp_path / "o")])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "jump.json" in lines[0] and not (tmp_path / "o").exists()
