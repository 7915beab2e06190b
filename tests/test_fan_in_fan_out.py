"""GPT-2 style Conv1D layers store weights as (in, out) and PEFT LoRA sets fan_in_fan_out: the whole
pipeline must honour it (features in (out, in) coordinates, merged weights transposed back)."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

import nextrap
from conftest import save_drifting_run
from nextrap.io.checkpoints import load_trajectory


def _gpt2_run(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    save_drifting_run(model, tmp_path / "ckpts", range(0, 120, 10), 0.02, noise=1e-3, seed=1, name="checkpoint-{}")
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
