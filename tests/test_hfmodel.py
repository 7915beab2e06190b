import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nextrap
from conftest import BASE, TRAJECTORY
from nextrap.io.checkpoints import load_trajectory
from nextrap.core.errors import NextrapError
from nextrap.io.hfmodel import INDEX, weight_map
from nextrap.engine.budget import parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200KB") == 200_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("123") == 123
    with pytest.raises(NextrapError):
        parse_size("lots")


def _sharded_copy(src, dst, n=3):
    """The tiny base re-saved as n shards with an index, the way large models ship."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(str(src / "model.safetensors"))
    keys = list(sd)
    wmap = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        wmap.update({k: name for k in part})
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dst


def _merged_state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_merged_output_equals_the_adapter_merge_and_loads_from_sharded_base(fitted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = _sharded_copy(BASE, tmp_path / "base-sharded")
    assert len(set(weight_map(sharded).values())) == 3
    nextrap.extend(fitted, [1.5], tmp_path / "adapter")
    res = nextrap.extend(fitted, [1.5], tmp_path / "merged", fmt="merged", base=sharded, max_shard_size="100KB")
    out = res.out
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / INDEX).is_file()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    merged = _merged_state(out)
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), tmp_path / "adapter").merge_and_unload().state_dict()
    for k in via_peft:
        assert torch.allclose(merged[k], via_peft[k], atol=2e-6), k
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.generate(**tok("1+1=", return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] == 7


def test_merged_needs_the_right_base(fitted, tmp_path):
    with pytest.raises(NextrapError, match="needs --base"):
        nextrap.extend(fitted, [1.0], tmp_path / "m", fmt="merged")
    with pytest.raises(NextrapError, match="no model.safetensors"):
        nextrap.extend(fitted, [1.0], tmp_path / "m", fmt="merged", base=TRAJECTORY)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    sd = load_file(str(BASE / "model.safetensors"))
    key = load_trajectory(TRAJECTORY).modules[0].base_key
    sd[key] = torch.zeros(3, 3)
    save_file(sd, str(wrong / "model.safetensors"))
    with pytest.raises(NextrapError, match=f"{key} has shape \\[3, 3\\]"):
        nextrap.extend(fitted, [1.0], tmp_path / "m", fmt="merged", base=wrong)
    assert not (tmp_path / "m").exists()


def test_model_safetensors_wins_over_an_index_beside_it_as_in_transformers(tmp_path):
    # transformers' from_pretrained loads model.safetensors when it exists, whatever index lies beside it
    folder = _sharded_copy(BASE, tmp_path / "both")
    (folder / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes())
    assert set(weight_map(folder).values()) == {folder / "model.safetensors"}
    assert len(set(weight_map(_sharded_copy(BASE, tmp_path / "sharded")).values())) == 3
