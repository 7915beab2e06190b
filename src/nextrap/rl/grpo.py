"""The bundled GRPO runner: LoRA RLVR that writes the checkpoint trajectory nextrap reads.

One loop, top to bottom (`train`):

    for step in 1..steps:
        pick batch_prompts prompts, sample group_size completions each (temperature T)
        score them with the reward -> rewards [P, G]
        advantages: grpo | rloo | reinforce++ (see the functions below)
        loss = -sum(adv * log p(token)) / number of completion tokens   (token-level, on-policy)
        AdamW step on the LoRA parameters
        every save_every steps: save the adapter (and optimizer state), evaluate
        every jump_every steps (optional): jump the LoRA base weights in place (nextrap.api.jumps.jump_in_place)

Each update uses the samples drawn from the current policy once (no PPO clipping,
no reference model, no KL term), so the importance ratio is exactly 1 and the loss
gradient is the plain policy gradient.

Outputs in `out`:
    step_0/, step_10/, ...   PEFT adapters (adapter_config.json + adapter_model.safetensors)
                             plus optimizer.safetensors (AdamW moments, keyed by parameter name)
    metrics.jsonl            one row per step; eval fields (eval_*) on the rows of evaluated steps;
                             step 0 has only eval fields; "jump" (the record of jump_in_place) on jump steps
    nextrap-jumps/step_N/    with jump_every: each jump's factors, as the TRL callback saves them, so that
                             `nextrap fold MODEL OUT/nextrap-jumps --upto M` gives the base step_M loads on
    .nextrap-output.json     written first, in an empty folder: marks it a grpo run, which --overwrite may empty

Repeated jumps (RL-Extra style, ``jump_every`` K): at every K-th step but the last, after that step's save and
eval, the checkpoints saved since the previous jump are fitted and the move, times alpha (a number, the
backtest's, or the candidate whose jumped model has the highest mean reward on ``select_prompts`` training
prompts held out of the training stream), is added to the frozen base weights; the adapter and AdamW state go
on unchanged, at rank r. A fit that cannot be made yet (too few checkpoints since the last jump) is recorded
and skipped.

Sampling is a short hand-written batched loop with a KV cache (`sample`): on the embedded model it is
as fast as `generate`, it is deterministic given a torch.Generator, and it does not depend on
`generate`'s defaults (top-k, repetition penalties, generation_config.json) that change between versions.
LoRA is stock peft with lora_dropout=0. Median seconds per step on the embedded model (64 prompts x 8,
r 64, all 7 linear types, 2 CPU cores): peft 0.52, hand-written LoRA 0.52, peft sampling with the adapter
merged 0.49 (not used: unmerging leaves rounding drift in the base weights), peft sampling through
`generate` 0.54, peft with lora_dropout=0.05 0.80 (dropout, not peft, is the slow part), no LoRA 0.37.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from nextrap.io.checkpoints import LoraModule
from nextrap.io.files import RUN_KIND, check_apart, write_marker
from nextrap.core.errors import NextrapError
from nextrap.rl.grpo_config import ADVANTAGES, ALL_LINEAR, GRPOConfig, GRPOError, default_model_dir  # noqa: F401 - re-exported
from nextrap.api.jumps import JUMPS, JumpSettings, choose_by_score, jump_in_place, parse_jump_alpha
from nextrap.core.registry import check_method
from nextrap.methods import Jump
from nextrap.rl.tasks import Example, Reward, TaskError, get_task, load_jsonl, load_reward, math_reward

OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class GRPOResult:
    out: Path
    steps: int
    checkpoints: list[Path]
    seconds_per_step: float  # mean over training steps (excludes eval and saving)
    last_reward_mean: float | None
    evals: list[dict[str, float]] = field(default_factory=list)  # one per evaluated step
    jumps: list[dict[str, Any]] = field(default_factory=list)  # one record per jump step (alpha 0 / error: none made)


# ---------------------------------------------------------------------------
# Advantages: rewards [prompts, group] -> advantages [prompts, group]


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), std unbiased as in TRL and verl."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other G-1 samples of the same prompt (= G/(G-1) (r - mean))."""
    g = rewards.shape[1]
    if g < 2:
        raise GRPOError("rloo needs group_size >= 2")
    return (rewards - rewards.mean(dim=1, keepdim=True)) * (g / (g - 1))


def reinforce_pp_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ with a group baseline (verl's reinforce_plus_plus_baseline, without its KL term):
    subtract the group mean, then whiten over the whole batch: (a - mean(a)) / (std(a) + eps).
    verl whitens per token; here every sequence counts once (the reward is per sequence)."""
    a = rewards - rewards.mean(dim=1, keepdim=True)
    return (a - a.mean()) / (a.std() + eps) if a.numel() > 1 else a


def compute_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "grpo":
        return grpo_advantages(rewards)
    if kind == "rloo":
        return rloo_advantages(rewards)
    if kind == "reinforce++":
        return reinforce_pp_advantages(rewards)
    raise GRPOError(f"unknown advantage {kind!r}; choose one of {', '.join(ADVANTAGES)}")


# ---------------------------------------------------------------------------
# Sampling and log-probabilities


def encode_prompts(tokenizer: Any, prompts: list[str], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, so that every completion starts at the same column."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _cache_kwarg(model: Any) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # left padding shifts real tokens right; positions count real tokens only
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sample(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Completions [B, <= max_new_tokens]: batched sampling with a KV cache; temperature 0 = greedy.
    After a sequence's eos every position is pad_id; generation stops early when all are done."""
    with torch.inference_mode():  # no autograd bookkeeping while sampling
        tokens = _sample_tokens(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_id, pad_id, generator)
    return tokens.clone()  # a normal tensor again, usable in the training forward


def _sample_tokens(model, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_id, pad_id, generator):
    batch = prompt_ids.shape[0]
    mask = prompt_mask
    positions = _positions(mask)
    cache = {_cache_kwarg(model): DynamicCache()}  # filled in place by every forward below
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        if done.all() or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache,
        )
    return torch.stack(tokens, dim=1)


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for completion tokens up to and including the first eos, 0 after it."""
    is_eos = (completions == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def decode_completions(tokenizer: Any, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(completions, mask)]


def completion_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: torch.Tensor,
    comp_mask: torch.Tensor,
) -> torch.Tensor:
    """log p(completion token | everything before) [B, T], with gradients."""
    ids = torch.cat([prompt_ids, completions], dim=1)
    mask = torch.cat([prompt_mask, comp_mask], dim=1)
    t = completions.shape[1]
    # the logits at positions P-1 .. P+T-2 predict the T completion tokens
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=t + 1).logits
    logits = logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, completions[..., None]).squeeze(-1)


def policy_gradient_loss(logp: torch.Tensor, comp_mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Token-level PG loss: every completion token in the batch weighs the same (DAPO-style),
    so long completions are not down-weighted the way a per-sequence mean would."""
    m = comp_mask.to(logp.dtype)
    return -(advantages[:, None] * logp * m).sum() / m.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    reward: Reward,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch: int = 1024,
    greedy: bool = True,
) -> dict[str, float]:
    """Held-out greedy accuracy and sampled accuracy (mean reward of `samples` samples per prompt; `greedy`
    False: sampled only). The sampling noise is seeded the same at every call, so checkpoints are compared on
    equal terms."""
    device = str(next(model.parameters()).device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def run(prompts: list[Example], temp: float, repeat: int) -> torch.Tensor:
        scores = []
        per_batch = max(1, batch // repeat)
        for i in range(0, len(prompts), per_batch):
            chunk = prompts[i : i + per_batch]
            ids, mask = encode_prompts(tokenizer, [e.prompt for e in chunk], device)
            ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
            comp = sample(model, ids, mask, max_new_tokens, temp, eos, pad, generator)
            texts = decode_completions(tokenizer, comp, completion_mask(comp, eos))
            answers = [e.answer for e in chunk for _ in range(repeat)]
            scores.append(torch.tensor([reward(c, a) for c, a in zip(texts, answers)]).view(len(chunk), repeat))
        return torch.cat(scores)

    was_training = model.training
    model.eval()
    result = {"eval_prompts": float(len(examples))}
    if greedy:
        result["eval_greedy_acc"] = run(examples, 0.0, 1).mean().item()
    if samples > 0:
        sampled = run(examples, temperature, samples).mean(dim=1)  # per-prompt accuracy
        result["eval_sampled_acc"] = sampled.mean().item()
        result["eval_sampled_se"] = (sampled.std() / math.sqrt(len(sampled))).item() if len(sampled) > 1 else 0.0
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------
# Loading and saving


def _resolve_data(config: GRPOConfig) -> tuple[list[Example], list[Example], list[Example], Reward]:
    """Training prompts, held-out prompts, the prompts held out of training for choosing alpha by reward (the
    last ``select_prompts`` training prompts) and the reward."""
    try:
        if config.data:
            train = load_jsonl(config.data)
            heldout = load_jsonl(config.eval_data) if config.eval_data else []
            reward = load_reward(config.reward) if config.reward else math_reward
        else:
            task = get_task(config.task or "addition")
            train, heldout = task.train, task.heldout
            reward = load_reward(config.reward) if config.reward else task.reward
    except TaskError as e:
        raise GRPOError(str(e)) from None
    n = config.select_prompts
    if n and n >= len(train):
        raise GRPOError(f"select_prompts {n}: the training set has only {len(train)} prompts")
    return (train[:-n], heldout, train[-n:], reward) if n else (train, heldout, [], reward)


def load_policy(config: GRPOConfig) -> tuple[Any, Any]:
    """The LoRA-wrapped model (peft) and its tokenizer, per config.model / init_model / init_adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = config.model or str(default_model_dir())
    if config.model is None and not Path(model_dir).is_dir():
        raise GRPOError(f"embedded default model missing at {model_dir}; run `python fixtures/make_addition_lm.py` or pass --model")
    weights_dir = config.init_model or model_dir
    for d in (weights_dir, config.init_adapter):
        if d and not Path(d).exists() and Path(d).is_absolute():
            raise GRPOError(f"{d}: no such folder")
    if config.init_adapter and not (Path(config.init_adapter) / "adapter_config.json").is_file():
        raise GRPOError(f"{config.init_adapter}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        # the tokenizer comes with the model; a merged model folder may carry its own
        tok_dir = config.init_model if config.init_model and (Path(config.init_model) / "tokenizer_config.json").is_file() else model_dir
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        base = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise GRPOError(f"cannot load model from {weights_dir}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base.to(config.device)
    if config.init_adapter:
        model = PeftModel.from_pretrained(base, config.init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,  # dropout would make the sampled policy differ from the trained one
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(base, lora)
        except ValueError as e:
            raise GRPOError(f"cannot apply LoRA: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def _trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], path: Path) -> None:
    """AdamW moments keyed by parameter name, as plain tensors (no pickle)."""
    tensors = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{name}::{key}"] = torch.as_tensor(state[key]).detach().cpu().clone().contiguous()
    save_file(tensors, str(path))


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], path: Path) -> int:
    """Restore AdamW moments by parameter name. A saved moment smaller than its parameter (a LoRA adapter
    whose rank grew, e.g. a rank-(r+1) jumped adapter) fills the leading block. The new entries get a zero
    first moment and the block's mean second moment: with zeros there, Adam's bias correction for the carried
    step count would give them steps up to ~2.5x larger than the trained entries'. Returns the number restored."""
    saved = load_file(str(path))
    restored = 0
    for name, p in params.items():
        if f"{name}::exp_avg" not in saved:
            continue
        state = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = saved[f"{name}::{key}"]
            if t.dim() != p.dim() or any(a > b for a, b in zip(t.shape, p.shape)):
                raise GRPOError(f"{path}: optimizer state for {name} has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}")
            fill = t.float().mean().item() if key == "exp_avg_sq" else 0.0
            full = torch.full_like(p, fill, memory_format=torch.preserve_format).detach()
            full[tuple(slice(0, s) for s in t.shape)] = t.to(full)
            state[key] = full
        state["step"] = saved.get(f"{name}::step", torch.tensor(0.0)).float().cpu()
        optimizer.state[p] = state
        restored += 1
    if restored == 0:
        raise GRPOError(f"{path}: no optimizer state matches this model's LoRA parameters")
    return restored


def save_checkpoint(model: Any, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    model.save_pretrained(str(path))
    if optimizer is not None:
        save_optimizer_state(optimizer, _trainable(model), path / OPTIMIZER_FILE)


# ---------------------------------------------------------------------------
# The loop


def _prompt_stream(examples: list[Example], seed: int):
    """Endless epochs over the training prompts, each in a fresh seeded order."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in order:
            yield examples[i]


def validate(config: GRPOConfig) -> None:
    """Every check that needs no model: options, data files and the reward, so a CLI can fail before writing."""
    _check(config)
    _resolve_data(config)


def jump_settings(config: GRPOConfig) -> JumpSettings | None:
    """The in-place jump the config asks for (None: jump_every 0)."""
    if not config.jump_every:
        return None
    alpha, candidates = parse_jump_alpha(config.jump_alpha)
    # a named method is fitted alone: next's model, say, needs more checkpoints than linear's straight line
    methods = ("linear", "next") if config.jump_method == "auto" else (config.jump_method,)
    return JumpSettings(method=config.jump_method, alpha=alpha, reward_alphas=candidates, methods=methods,
                        horizon=config.jump_horizon, epochs=config.jump_epochs)


def _check(config: GRPOConfig) -> None:
    if config.advantage not in ADVANTAGES:
        raise GRPOError(f"unknown advantage {config.advantage!r}; choose one of {', '.join(ADVANTAGES)}")
    for name in ("steps", "save_every", "batch_prompts", "group_size", "max_new_tokens", "lora_r"):
        if getattr(config, name) < (0 if name == "steps" else 1):
            raise GRPOError(f"{name} must be positive, got {getattr(config, name)}")
    if config.group_size < 2:
        raise GRPOError("group_size must be >= 2: advantages compare samples of the same prompt")
    if config.temperature <= 0:
        raise GRPOError("temperature must be > 0 for sampling during training")
    if config.select_prompts < 0:
        raise GRPOError(f"select_prompts must be >= 0, got {config.select_prompts}")
    if config.jump_every < 0 or config.jump_every % config.save_every:
        raise GRPOError(f"jump_every {config.jump_every}: must be a multiple of save_every {config.save_every} "
                        "(a jump fits the checkpoints saved up to its step), or 0 for no jumps")
    check_method(config.jump_method, "jump_method")
    if config.jump_horizon < 1 or config.jump_epochs < 1:
        raise GRPOError("jump_horizon and jump_epochs must be at least 1")
    _, candidates = parse_jump_alpha(config.jump_alpha)
    if candidates and config.select_prompts < 1:
        raise GRPOError(f"jump_alpha {config.jump_alpha}: choosing alpha by reward needs held-out prompts; set "
                        "select_prompts (e.g. 256: the last 256 training prompts, left out of training)")
    check_apart(Path(config.out), config.inputs())  # a run never writes over what it reads (resuming its own step)


RUN_TREES = ("step_*", "metrics.jsonl", "grpo_config.json", JUMPS)  # what a run writes into its folder


def _start_run(out: Path) -> None:
    """Make the run folder and, when nothing is in it yet, mark it as a grpo run that owns ``RUN_TREES`` whole:
    the proof ``--overwrite`` asks for before it empties the folder for a new run."""
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        write_marker(out, RUN_KIND, trees=RUN_TREES)


def train(config: GRPOConfig, progress: Callable[[str, int, int], None] | None = None) -> GRPOResult:
    """Run GRPO-style LoRA RLVR and write adapters + metrics to config.out (see the module docstring).
    `progress(stage, done, total)` is called after every step. Bad input raises GRPOError before
    anything is written."""
    _check(config)
    torch.manual_seed(config.seed)
    train_set, heldout, select, reward = _resolve_data(config)
    heldout = heldout[: config.eval_prompts]
    model, tokenizer = load_policy(config)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    if config.resume_optimizer:
        opt_path = Path(config.resume_optimizer)
        opt_path = opt_path / OPTIMIZER_FILE if opt_path.is_dir() else opt_path
        if not opt_path.is_file():
            raise GRPOError(f"{opt_path}: no optimizer state to resume")
        load_optimizer_state(optimizer, params, opt_path)
    out = Path(config.out)
    _start_run(out)
    lora = model.peft_config["default"]  # with init_adapter, the adapter's own rank and targets
    saved = {**asdict(config), "lora_r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules)}
    (out / "grpo_config.json").write_text(json.dumps(saved, indent=2) + "\n")

    eval_every = config.save_every if config.eval_every is None else config.eval_every
    # the same seed gives the same prompt order and sampling noise: continuing a run with its own seed
    # replays its prompts, while two continuations (jump / no jump) with one seed see the same data
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    prompts = _prompt_stream(train_set, config.seed)
    checkpoints, evals, step_times, jumps = [], [], [], []
    reward_mean = None
    jumper = jump_settings(config)
    score = (lambda: select_reward(model, tokenizer, select, reward, config)) if select else None
    metrics = (out / "metrics.jsonl").open("w")

    def checkpoint(step: int, row: dict[str, Any]) -> None:
        """Save the adapter and evaluate when due, jump when due, then write the step's metrics row."""
        last = step == config.steps
        if step % config.save_every == 0 or last:
            path = out / f"step_{step}"
            save_checkpoint(model, optimizer if config.save_optimizer else None, path)
            checkpoints.append(path)
        if heldout and eval_every > 0 and (step % eval_every == 0 or last):
            ev = evaluate(model, tokenizer, heldout, reward, config.eval_samples, config.temperature,
                          config.max_new_tokens, config.eval_seed, config.eval_batch)
            evals.append({"step": step, **ev})
            row.update(ev)
        if jumper is not None and 0 < step < config.steps and step % config.jump_every == 0:
            row["jump"] = _jump(model, out, step, jumper, score)
            jumps.append(row["jump"])
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    model.train()
    checkpoint(0, {"step": 0})  # step 0 = the starting point of the trajectory
    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        batch = [next(prompts) for _ in range(config.batch_prompts)]
        ids, mask = encode_prompts(tokenizer, [e.prompt for e in batch], config.device)
        ids = ids.repeat_interleave(config.group_size, 0)
        mask = mask.repeat_interleave(config.group_size, 0)

        # 1. sample G completions per prompt from the current policy
        comp = sample(model, ids, mask, config.max_new_tokens, config.temperature, eos, pad, generator)
        comp_mask = completion_mask(comp, eos)

        # 2. score them
        texts = decode_completions(tokenizer, comp, comp_mask)
        answers = [e.answer for e in batch for _ in range(config.group_size)]
        rewards = torch.tensor([float(reward(c, a)) for c, a in zip(texts, answers)])
        advantages = compute_advantages(rewards.view(config.batch_prompts, config.group_size), config.advantage)

        # 3. one policy-gradient step (on-policy: no importance ratio, no PPO clip, no KL)
        logp = completion_logprobs(model, ids, mask, comp, comp_mask)
        loss = policy_gradient_loss(logp, comp_mask, advantages.flatten().to(logp.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm before clipping, logged: how hard this batch pushed
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        optimizer.step()

        seconds = time.perf_counter() - t0
        step_times.append(seconds)
        reward_mean = rewards.mean().item()
        row = {
            "step": step,
            "reward_mean": reward_mean,
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "completion_tokens": comp_mask.sum(dim=1).float().mean().item(),
            "seconds_per_step": seconds,
        }
        checkpoint(step, row)
        if progress is not None:
            progress("grpo steps", step, config.steps)
    metrics.close()  # an exception leaves it to the garbage collector: rows are flushed as written
    return GRPOResult(
        out=out,
        steps=config.steps,
        checkpoints=checkpoints,
        seconds_per_step=sum(step_times) / len(step_times) if step_times else 0.0,
        last_reward_mean=reward_mean,
        evals=evals,
        jumps=jumps,
    )


def _jump(model: Any, out: Path, step: int, settings: JumpSettings, score: Callable[[], float] | None) -> dict[str, Any]:
    """``jump_in_place`` at ``step``; a jump that cannot be made (too few checkpoints since the last one to fit)
    is recorded with its reason, and training goes on."""
    t0 = time.perf_counter()
    try:
        return jump_in_place(model, out, step, settings, score=score)
    except NextrapError as e:
        return {"step": step, "alpha": 0.0, "error": str(e), "saved": None, "seconds": time.perf_counter() - t0}


def select_reward(model: Any, tokenizer: Any, examples: list[Example], reward: Reward, config: GRPOConfig) -> float:
    """The score alpha is chosen by: the mean reward of max(1, eval_samples) sampled completions per prompt of
    ``examples`` (the selection prompts), with the eval's fixed sampling noise, so every candidate sees the same."""
    return evaluate(model, tokenizer, examples, reward, max(1, config.eval_samples), config.temperature,
                    config.max_new_tokens, config.eval_seed, config.eval_batch, greedy=False)["eval_sampled_acc"]


def choose_alpha_by_reward(config: GRPOConfig, move: Jump, modules: list[LoraModule],
                           alphas: list[float]) -> tuple[float, dict[float, float]]:
    """Load ``config``'s policy (e.g. ``init_adapter`` = the checkpoint to jump from) and return the alpha among
    ``alphas`` whose jumped model has the highest ``select_reward`` on the selection prompts, and every score."""
    _check(config)
    _, _, select, reward = _resolve_data(config)
    if not select:
        raise GRPOError("choosing alpha by reward needs select_prompts > 0 (prompts held out of the training stream)")
    model, tokenizer = load_policy(config)
    return choose_by_score(model, move, alphas, modules, lambda: select_reward(model, tokenizer, select, reward, config))
