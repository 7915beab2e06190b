"""GPT-2 style Conv1D layers store weights as (in, out) and PEFT LoRA sets fan_in_fan_out: the whole
pipeline must honour it (features in (out, in) coordinates, merged weights transposed back)."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

import nextrap
from nextrap.checkpoints import load_trajectory


def _gpt2_run(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    g = torch.Generator().manual_seed(1)
    layers = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    drift = {id(m): torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.02 for m in layers}
    for step in range(0, 120, 10):
        with torch.no_grad():
            for m in layers:
                m.lora_B["default"].weight.copy_(drift[id(m)] * (step / 100) ** 0.7 + 1e-3 * torch.randn(drift[id(m)].shape, generator=g))
        model.save_pretrained(tmp_path / "ckpts" / f"checkpoint-{step}")
    return tmp_path / "base", tmp_path / "ckpts"


def test_fan_in_fan_out_adapter_and_merged_agree_with_peft(tmp_path):
    base, ckpts = _gpt2_run(tmp_path)
    traj = load_trajectory(ckpts)
    attn = next(m for m in traj.modules if m.name.endswith("c_attn"))
    assert attn.fan_in_fan_out and (attn.out_features, attn.in_features) == (96, 32)
    nextrap.fit(ckpts, out=tmp_path / "fit", epochs=3, horizon=3)
    nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "adapter")
    nextrap.extend(tmp_path / "fit", [1.5], tmp_path / "merged", fmt="merged", base=base)
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    last = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ckpts / "checkpoint-110").merge_and_unload().state_dict()
    for m in traj.modules:
        assert merged[m.base_key].shape == (m.in_features, m.out_features)
        assert torch.allclose(merged[m.base_key], via_peft[m.base_key], atol=1e-6)
        assert not torch.allclose(merged[m.base_key], last[m.base_key], atol=1e-6)  # the jump moved it
