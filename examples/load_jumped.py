"""Load a jumped adapter (PEFT) and a jumped merged model (transformers), generate from each, and check the
adapter's merged weights against nextrap.json / prediction.safetensors.

usage: python examples/load_jumped.py BASE_DIR JUMPED_ADAPTER_DIR JUMPED_MERGED_DIR
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(base: Path, adapter: Path, merged: Path) -> None:
    tok = AutoTokenizer.from_pretrained(base)
    prompt = tok("12+34=", return_tensors="pt")
    info = json.loads((adapter / "nextrap.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    print(f"adapter  {adapter}: method {info['method']}, alpha {info['alpha']}, jumped from step {info['from_step']} "
          f"(horizon {info['horizon']}), LoRA rank {model.peft_config['default'].r}")
    print(f"         generates {tok.decode(out[0], skip_special_tokens=True)!r} (random-init base: the text is noise)")
    full = AutoModelForCausalLM.from_pretrained(merged)
    info = json.loads((merged / "nextrap.json").read_text())
    out = full.generate(**prompt, max_new_tokens=8, do_sample=False)
    n = sum(p.numel() for p in full.parameters())
    print(f"merged   {merged}: method {info['method']}, alpha {info['alpha']}, {n:,} parameters")
    print(f"         generates {tok.decode(out[0], skip_special_tokens=True)!r}")
    base_sd = AutoModelForCausalLM.from_pretrained(base).state_dict()
    moved = sum(float((full.state_dict()[k] - v).norm() ** 2) for k, v in base_sd.items()) ** 0.5
    print(f"         ||W_merged - W_base|| = {moved:.4f}")
    assert torch.isfinite(torch.tensor(moved))


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
