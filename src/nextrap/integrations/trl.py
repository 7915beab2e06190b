"""Jump inside a running TRL (or any Hugging Face ``Trainer``) LoRA run, without stopping it.

    trainer = GRPOTrainer(model=MODEL, peft_config=lora, args=args, ...,
                          callbacks=[JumpCallback(steps=[150])])

At each named step, right after the checkpoint of that step is saved, ``JumpCallback`` fits the run's saved
checkpoints (``nextrap.fit`` with fast methods, by default ``linear`` and ``next``), chooses the method and
alpha as ``nextrap extend --method auto --alpha auto`` does (``extend.plan``: alpha 0, no jump, when the backtest
finds nothing better than standing still), and adds alpha * move to the frozen base weight of every LoRA
module in place. Since W_c + alpha * move = (W_0 + alpha * move) + s B_c A_c, training goes on from the jumped
weights with the adapter, optimizer, schedule and step count untouched.

The adapters saved afterwards are relative to the jumped base, so every jump is saved beside the checkpoints
(``OUTPUT_DIR/nextrap-jumps/step_N/``, see ``nextrap.api.jumps``), and

    nextrap fold MODEL OUTPUT_DIR/nextrap-jumps --upto M --out BASE_M

writes the base on which checkpoint M loads (and resumes: ``GRPOTrainer(model=BASE_M, peft_config=lora, ...)
.train(resume_from_checkpoint="OUTPUT_DIR/checkpoint-M")``) as it was trained. A later jump is fitted on the
checkpoints saved since the previous one only (those span a single base).

The callback needs nothing from TRL itself (it is a ``transformers.TrainerCallback``); it lives here because
TRL is where RLVR runs with LoRA are trained, and it is tested with TRL's GRPOTrainer (``tests/test_trl.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

from nextrap.core.errors import NextrapError
from nextrap.api.jumps import JUMPS, JumpSettings, jump_in_place

logger = logging.getLogger(__name__)


class JumpCallback(TrainerCallback):
    """At the steps in ``steps``: fit the saved checkpoints, choose, jump the base weights in place, save the jump.

    ``method`` / ``alpha``: as ``extend --method`` / ``--alpha`` (``"auto"`` / None = chosen by the backtest);
    ``methods``, ``horizon``, ``backtest_folds``, ``epochs``: as ``nextrap fit``. ``history`` records every
    decision (also logged, and written to each jump's ``jump.json``). The work is ``nextrap.api.jumps.jump_in_place``,
    shared with the bundled runner's ``--jump-every``."""

    def __init__(self, steps: Iterable[int], method: str = "auto", alpha: float | None = None,
                 methods: tuple[str, ...] = ("linear", "next"), horizon: int = 5, backtest_folds: int = 1,
                 epochs: int = 1000):
        self.steps = set(steps)
        self.settings = JumpSettings(method=method, alpha=alpha, methods=tuple(methods), horizon=horizon,
                                     backtest_folds=backtest_folds, epochs=epochs)
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        every = args.save_steps
        if args.save_strategy == "steps" and float(every).is_integer() and every >= 1:  # else: checked at the step
            unsaved = sorted(s for s in self.steps if s % int(every))
            if unsaved:
                raise NextrapError(f"JumpCallback steps {unsaved}: the trainer saves every {int(every)} steps; a jump "
                                   "needs the checkpoint of its step")
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return control
        try:  # every process applies the same jump (the fit is deterministic); the main one saves it
            record = self.jump(model, Path(args.output_dir), state.global_step, save=state.is_world_process_zero)
        except NextrapError as e:  # too few checkpoints to fit, say: the run goes on without a jump
            logger.warning("nextrap: step %d: no jump: %s", state.global_step, e)
            record = {"step": state.global_step, "alpha": 0.0, "error": str(e), "saved": None}
        self.history.append(record)
        return control

    def jump(self, model: Any, output_dir: Path, step: int, save: bool = True) -> dict[str, Any]:
        """Fit, choose and jump at ``step`` (its checkpoint already saved under ``output_dir``); returns the record."""
        record = jump_in_place(model, output_dir, step, self.settings, save=save)
        if record["alpha"] == 0:
            reason = record["choice"]["reason"] if record["choice"] else "alpha 0"
            logger.warning("nextrap: step %d: no jump (%s)", step, reason)
            return record
        reason = f" ({record['choice']['reason']})" if record["choice"] else ""
        logger.warning("nextrap: step %d: jumped the base weights with %s at alpha %g%s; saved %s (load later "
                       "checkpoints on `nextrap fold BASE %s`)", step, record["method"], record["alpha"], reason,
                       record["saved"], Path(output_dir) / JUMPS)
        return record
