
import pytest
import torch

from conftest import TRAJECTORY, LORA_CONFIG, lora_tensors, write_adapter
from nextrap.writers.adapter import jumped_config, scale_appended
from nextrap.io.checkpoints import load_trajectory, module_scale


@pytest.mark.parametrize("alpha", [1.5, 0.0, -0.5])
def test_appended_factors_add_alpha_times_the_move(alpha):
    torch.manual_seed(0)
    b, a = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    p, q = torch.randn(6, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    s = 2.0
    nb, na = torch.cat([b, p], 1), torch.cat([a, q.mT], 0)
    scale_appended(nb, na, 4, s, alpha)
    assert nb.shape == (6, 5) and na.shape == (5, 5)
    assert torch.equal(nb[:, :4], b) and torch.equal(na[:4], a)  # the trained columns are untouched
    assert torch.allclose(s * nb @ na, s * b @ a + alpha * p @ q.mT, atol=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
def test_jumped_config_keeps_every_modules_scale(tmp_path, rslora):
    modules = {"base_model.model.layers.0.q": (6, 5, 2), "base_model.model.layers.0.k": (3, 5, 4),
               "base_model.model.layers.1.q": (6, 5, 4)}
    cfg = {**LORA_CONFIG, "use_rslora": rslora, "rank_pattern": {"layers.0.q": 2}, "alpha_pattern": {"layers.0.q": 3}}
    for i in (1, 2):
        write_adapter(tmp_path / f"step_{i}", lora_tensors(i, modules), cfg)
    traj = load_trajectory(tmp_path)
    extra = {"base_model.model.layers.0.q": 1, "base_model.model.layers.0.k": 1, "base_model.model.layers.1.q": 8}
    new = jumped_config(cfg, traj, extra)
    for m in traj.modules:
        rel = m.name.removeprefix("base_model.model.")
        rank = new["rank_pattern"].get(rel, new["r"])
        alpha = new["alpha_pattern"].get(rel, new["lora_alpha"])
        assert rank == m.rank + extra[m.name]
        assert module_scale({**new, "alpha_pattern": {rel: alpha}}, m.name, rank) == pytest.approx(m.scale)


def test_jumped_adapter_loads_in_peft_and_merges_to_the_jump(fitted, tmp_path):
    """fit -> extend -> PeftModel.from_pretrained: merged weights equal W_c + alpha * delta; it generates."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nextrap
    from conftest import BASE

    res = nextrap.extend(fitted, [1.5], tmp_path / "jumped", method="next-paper")  # rank-1: r + 1
    pred = load_file(str(tmp_path / "jumped" / "prediction.safetensors"))
    traj = load_trajectory(TRAJECTORY)
    last = traj.checkpoints[-1].path
    base = AutoModelForCausalLM.from_pretrained(BASE)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, res.out)
    assert model.peft_config["default"].r == 9
    tok = AutoTokenizer.from_pretrained(BASE)
    ids = tok("12+34=", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    merged = model.merge_and_unload().state_dict()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), last).merge_and_unload().state_dict()
    for m in traj.modules:
        sigma, u, v = pred[f"{m.name}:sigma"], pred[f"{m.name}:u"], pred[f"{m.name}:v"]
        expected = ref[m.base_key] + 1.5 * sigma * torch.outer(u, v)
        assert torch.allclose(merged[m.base_key], expected, atol=1e-6), m.name
        assert not torch.equal(merged[m.base_key], w0[m.base_key])


def test_rank_and_alpha_patterns_with_rslora_survive_a_real_peft_load(tmp_path):
    """The rescaled config is read by PEFT itself (not by our own scale function) and merges exactly."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import nextrap
    from conftest import BASE, save_drifting_run

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    save_drifting_run(get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), cfg), tmp_path / "ckpts", range(0, 80, 10), 0.05)
    nextrap.fit(tmp_path / "ckpts", out=tmp_path / "fit", horizon=2, epochs=2)
    nextrap.extend(tmp_path / "fit", [2.0], tmp_path / "jumped", method="next-paper")
    pred = load_file(str(tmp_path / "jumped" / "prediction.safetensors"))
    last = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), tmp_path / "ckpts" / "step_70")
    last_sd = last.merge_and_unload().state_dict()
    jumped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), tmp_path / "jumped")
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in jumped.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(set(ranks.values())) == [3, 5]  # q_proj 2 + 1, the others 4 + 1
    merged = jumped.merge_and_unload().state_dict()
    traj = load_trajectory(tmp_path / "ckpts")
    for m in traj.modules:
        expected = last_sd[m.base_key] + 2.0 * pred[f"{m.name}:sigma"] * torch.outer(pred[f"{m.name}:u"], pred[f"{m.name}:v"])
        assert torch.allclose(merged[m.base_key], expected, atol=1e-6), m.name
