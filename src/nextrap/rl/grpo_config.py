"""The bundled GRPO runner's settings (``GRPOConfig``) and their names, with no torch import: the command line
declares its options from them and answers --help and usage errors in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nextrap.core.errors import NextrapError

ADVANTAGES = ("grpo", "rloo", "reinforce++")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GRPOError(NextrapError):
    """A configuration or input problem; the message is one line meant for the user."""


def default_model_dir() -> Path:
    """The embedded default model, shipped inside the package (``fixtures/addition-lm`` in a checkout links to
    it), so it is found from a wheel as well as from a checkout."""
    return Path(__file__).resolve().parents[1] / "embedded" / "addition-lm"


@dataclass
class GRPOConfig:
    model: str | None = None  # HF model folder or hub id; None = the embedded fixtures/addition-lm
    out: str = "grpo-run"
    steps: int = 400
    save_every: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    batch_prompts: int = 64
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 4  # enough for the addition task ("198" + eos); raise it for real math
    lora_r: int = 64
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    seed: int = 0
    task: str | None = "addition"  # a built-in task; ignored when `data` is given
    data: str | None = None  # jsonl of {"prompt", "answer"} rows for training
    eval_data: str | None = None  # jsonl for held-out eval with `data` (default: no eval)
    reward: str | None = None  # "module:function"; default exact match (addition) / math_reward (data)
    advantage: str = "grpo"  # grpo | rloo | reinforce++
    init_adapter: str | None = None  # continue training this PEFT adapter (its rank wins over lora_r)
    init_model: str | None = None  # base weights to start from (a merged jumped model, or with init_adapter a folded base)
    resume_optimizer: str | None = None  # step folder (or file) with optimizer.safetensors to continue from
    save_optimizer: bool = True
    eval_every: int | None = None  # None = at every save; 0 = never
    eval_prompts: int = 1000
    eval_samples: int = 8  # sampled accuracy = mean over this many samples per prompt (paper: 8)
    eval_batch: int = 1024  # sequences per sampling batch during eval
    eval_seed: int = 1234  # fixed apart from `seed`: runs with different seeds are evaluated on the same noise
    device: str = "cpu"
    jump_every: int = 0  # jump the LoRA base weights in place every K steps (a multiple of save_every); 0 = never
    jump_method: str = "auto"  # as extend --method
    jump_alpha: str = "auto"  # a number, auto (the backtest's), or reward:A,B,... (best mean reward on select_prompts)
    jump_horizon: int = 5  # checkpoints the jump's fit looks ahead
    jump_epochs: int = 1000  # next-paper's predictor epochs in the jump's fit
    select_prompts: int = 0  # the last N training prompts, held out of the training stream for choosing alpha by reward

    def inputs(self) -> dict[str, str | None]:
        """What a run reads from disk, by option name (None: not given; a hub id is not on disk): ``out`` may
        neither hold one of them nor lie inside one, or a run (or --overwrite) would write over its own inputs."""
        model = self.model or str(default_model_dir())
        return {"--model": model if Path(model).exists() else None, "--init-model": self.init_model,
                "--init-adapter": self.init_adapter, "--resume-optimizer": self.resume_optimizer,
                "--data": self.data, "--eval-data": self.eval_data}
