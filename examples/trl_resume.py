"""Continue a TRL GRPO run from a nextrap jump without restarting the trainer.

    W_c + alpha * move = (W_0 + alpha * move) + s B_c A_c

`nextrap extend --format base` writes W_0 + alpha * move: the base model with the jump folded in. A new
GRPOTrainer on that folder, with the run's own LoraConfig and GRPOConfig, resumes the run's checkpoint c as it
would after an interruption: its adapter (rank r), AdamW moments, learning-rate schedule, step count and RNG,
so training continues at step c + 1 on the jumped weights.

The three steps, with your own model, data and reward:

    1. train with checkpoints saved (save_steps); stop, or be stopped, after checkpoint c is written
    2. nextrap fit RUN --out FIT
       nextrap extend --fit FIT --method auto --alpha auto --format base --base MODEL --out JUMPED
    3. GRPOTrainer(model=JUMPED, peft_config=<the same LoraConfig>, args=<the same GRPOConfig>, ...)
           .train(resume_from_checkpoint="RUN/checkpoint-c")   # nextrap.json's resume_from

This script runs them on the embedded default (a tiny Llama that partly solves 2-digit addition), on a CPU, in
seconds:

    python examples/trl_resume.py --out trl-demo [--steps 16] [--jump-at 10] [--method auto] [--alpha auto]

On a run this short the backtest may well say not to jump (alpha 0): the resume then continues on the base
unchanged. `--method linear --alpha 1` forces a jump.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import nextrap
from nextrap.api.extend import parse_alphas
from nextrap.rl.grpo import default_model_dir
from nextrap.rl.tasks import exact_match, get_task


def lora_config() -> LoraConfig:
    """The run's LoraConfig: the same before and after the jump (a fresh object each time: PEFT writes into it)."""
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def addition_dataset(n: int = 256) -> Dataset:
    """The first n training prompts of the embedded addition task, with their answers for the reward."""
    return Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in get_task("addition").train[:n]])


def addition_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1 for an exactly right sum; TRL passes the dataset's other columns (here ``answer``) by name."""
    return [exact_match(c, a) for c, a in zip(completions, answer)]


def grpo_args(out: Path, steps: int, seed: int = 0) -> GRPOConfig:
    """Small enough for seconds on a CPU: 2 prompts x 4 completions of at most 4 tokens per step, a checkpoint
    every step. The schedule (linear decay over ``steps``) is the whole run's, before and after the jump."""
    return GRPOConfig(output_dir=str(out), max_steps=steps, save_steps=1, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=4, learning_rate=1e-3, seed=seed, use_cpu=True,
                      bf16=False, gradient_checkpointing=False, logging_steps=1, report_to="none",
                      disable_tqdm=True)


def make_trainer(model: str | Path, out: Path, steps: int, callbacks: list[TrainerCallback] | None = None) -> GRPOTrainer:
    """The run's trainer: the same LoraConfig, GRPOConfig, data and reward before and after the jump; only the
    model path changes (the base, then the base with the jump folded in)."""
    return GRPOTrainer(model=str(model), reward_funcs=addition_reward, args=grpo_args(out, steps),
                       train_dataset=addition_dataset(), peft_config=lora_config(), callbacks=callbacks)


class StopAfter(TrainerCallback):
    """Stop the run after step ``step`` (and its checkpoint): stands in for stopping a long run by hand."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def jump(run: Path, base: Path, out: Path, method: str = "auto", alphas: list[float] | None = None,
         horizon: int = 2) -> nextrap.ExtendResult:
    """Fit on the run's checkpoints and write the base with the jump folded in (``out/jumped``); the result's
    ``resume_from`` names the checkpoint to resume on it."""
    nextrap.fit(run, out=out / "fit", horizon=horizon, methods=("linear", "next"))
    return nextrap.extend(out / "fit", alphas, out / "jumped", fmt="base", base=base, method=method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("trl-demo"))
    parser.add_argument("--steps", type=int, default=16, help="the whole run's steps (its schedule)")
    parser.add_argument("--jump-at", type=int, default=10, help="the checkpoint c to jump from")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--alpha", default="auto")
    parser.add_argument("--horizon", type=int, default=2)
    a = parser.parse_args()
    base, run = default_model_dir(), a.out / "run"

    make_trainer(base, run, a.steps, [StopAfter(a.jump_at)]).train()                        # 1. train to step c
    res = jump(run, base, a.out, a.method, parse_alphas(a.alpha), a.horizon)                 # 2. fit, fold the jump
    print(f"jump: {res.method} at alpha {res.alphas[0]:g}" + (f" ({res.choice.reason})" if res.choice else ""))
    trainer = make_trainer(res.out, run, a.steps)                                            # 3. resume on it
    trainer.train(resume_from_checkpoint=res.resume_from["path"])
    print(f"resumed {res.resume_from['path']} at step {res.resume_from['step'] + 1} on {res.out}; "
          f"finished at step {trainer.state.global_step}")


if __name__ == "__main__":
    main()
