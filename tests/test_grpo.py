"""Specification of nextrap.rl.grpo (and its CLI, nextrap.cli.grpo) on the embedded addition model."""

import json
import shutil

import pytest
import torch
import typer
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from nextrap.rl.grpo import (
    OPTIMIZER_FILE,
    GRPOConfig,
    GRPOError,
    completion_logprobs,
    completion_mask,
    compute_advantages,
    default_model_dir,
    encode_prompts,
    grpo_advantages,
    load_optimizer_state,
    policy_gradient_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sample,
    save_optimizer_state,
    train,
)
from nextrap.cli.grpo import grpo

TINY = dict(steps=2, save_every=1, batch_prompts=4, group_size=4, lora_r=4, lora_alpha=8, eval_prompts=8, eval_samples=2)


# ---------------------------------------------------------------------------
# advantages, masks and the loss on small tensors


def test_grpo_advantages_normalize_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = grpo_advantages(r)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as in TRL / verl
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # all-correct group: no signal


def test_rloo_subtracts_the_mean_of_the_others():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[1.0 - 0.0, 0.0 - 1 / 3, 0.0 - 1 / 3, 0.0 - 1 / 3]])
    assert torch.allclose(rloo_advantages(r), expected)


def test_reinforce_pp_whitens_group_centred_rewards_over_the_batch():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    a = reinforce_pp_advantages(r)
    centred = torch.tensor([[0.5, -0.5], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(a, (centred - centred.mean()) / (centred.std() + 1e-6))
    assert abs(a.mean().item()) < 1e-6 and abs(a.std().item() - 1) < 1e-4


def test_compute_advantages_dispatch():
    r = torch.rand(3, 4)
    assert torch.equal(compute_advantages(r, "rloo"), rloo_advantages(r))
    with pytest.raises(GRPOError, match="unknown advantage"):
        compute_advantages(r, "ppo")


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    eos = 2
    comp = torch.tensor([[5, 6, 2, 0], [2, 0, 0, 0], [5, 5, 5, 5]])
    assert completion_mask(comp, eos).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_policy_gradient_loss_is_a_token_mean():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    assert policy_gradient_loss(logp, mask, adv).item() == pytest.approx(-(-1 - 2 + 3) / 3)


def test_optimizer_state_roundtrip_grows_with_the_rank(tmp_path):
    small = {"lora_A": torch.nn.Parameter(torch.randn(2, 3)), "lora_B": torch.nn.Parameter(torch.randn(3, 2))}
    opt = torch.optim.AdamW(small.values())
    sum(p.sum() for p in small.values()).backward()
    opt.step()
    save_optimizer_state(opt, small, tmp_path / OPTIMIZER_FILE)
    big = {"lora_A": torch.nn.Parameter(torch.randn(3, 3)), "lora_B": torch.nn.Parameter(torch.randn(3, 3))}
    opt2 = torch.optim.AdamW(big.values())
    assert load_optimizer_state(opt2, big, tmp_path / OPTIMIZER_FILE) == 2
    a = opt2.state[big["lora_A"]]["exp_avg"]
    assert torch.equal(a[:2], opt.state[small["lora_A"]]["exp_avg"]) and torch.equal(a[2], torch.zeros(3))
    b = opt2.state[big["lora_B"]]["exp_avg_sq"]
    old = opt.state[small["lora_B"]]["exp_avg_sq"]
    assert torch.equal(b[:, :2], old)
    assert torch.allclose(b[:, 2], old.mean().expand(3))  # new entries: the block's mean, not 0 (see the docstring)
    shrunk = {"lora_A": torch.nn.Parameter(torch.randn(1, 3))}
    with pytest.raises(GRPOError, match="has shape"):
        load_optimizer_state(torch.optim.AdamW(shrunk.values()), shrunk, tmp_path / OPTIMIZER_FILE)


# ---------------------------------------------------------------------------
# the embedded model and the sampler


@pytest.fixture(scope="module")
def lm():
    return AutoModelForCausalLM.from_pretrained(default_model_dir()).eval(), AutoTokenizer.from_pretrained(default_model_dir())


def test_embedded_model_tokenizer_roundtrip(lm):
    _, tok = lm
    ids = tok("23+45=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "23+45="
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_cached_left_padded_greedy_matches_full_recompute(lm):
    model, tok = lm
    prompts = ["3+4=", "23+45=", "99+99="]
    ids, mask = encode_prompts(tok, prompts)
    fast = sample(model, ids, mask, 4, 0.0, tok.eos_token_id, tok.pad_token_id)
    for i, p in enumerate(prompts):  # one prompt at a time, no padding, no cache
        seq = torch.tensor([tok(p)["input_ids"]])
        for t in range(fast.shape[1]):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            assert nxt.item() == fast[i, t].item()
            if nxt.item() == tok.eos_token_id:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_padded_batch_logprobs_match_one_at_a_time(lm):
    model, tok = lm
    prompts = ["3+4=", "23+45="]
    ids, mask = encode_prompts(tok, prompts)
    comp = torch.tensor([[tok.convert_tokens_to_ids("7"), tok.eos_token_id, tok.pad_token_id],
                         [tok.convert_tokens_to_ids("6"), tok.convert_tokens_to_ids("8"), tok.eos_token_id]])
    cmask = completion_mask(comp, tok.eos_token_id)
    with torch.no_grad():
        batched = completion_logprobs(model, ids, mask, comp, cmask)
        for i, p in enumerate(prompts):
            one = torch.tensor([tok(p)["input_ids"]])
            n = int(cmask[i].sum())
            alone = completion_logprobs(model, one, torch.ones_like(one), comp[i : i + 1, :n], cmask[i : i + 1, :n])
            assert torch.allclose(batched[i, :n], alone[0], atol=1e-5)


def test_sampling_is_seeded(lm):
    model, tok = lm
    ids, mask = encode_prompts(tok, ["12+34="] * 16)
    draw = lambda s: sample(model, ids, mask, 4, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


# ---------------------------------------------------------------------------
# train(): a few steps on the embedded default


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(GRPOConfig(out=str(out), **TINY)), out


def test_train_writes_loadable_adapters_every_save(run, lm):
    result, out = run
    assert [p.name for p in result.checkpoints] == ["step_0", "step_1", "step_2"]
    for p in result.checkpoints:
        assert (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file()
        assert (p / OPTIMIZER_FILE).is_file()
    base = AutoModelForCausalLM.from_pretrained(default_model_dir())
    loaded = PeftModel.from_pretrained(base, str(out / "step_2"))
    assert loaded.peft_config["default"].r == 4
    b = load_file(str(out / "step_2" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in b.items())  # it moved
    b0 = load_file(str(out / "step_0" / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in b0.items() if k.endswith("lora_B.weight"))  # step 0 = base


def test_train_writes_metrics_rows(run):
    result, out = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["seconds_per_step"] > 0
    for r in rows:  # eval at every save
        assert 0.0 <= r["eval_greedy_acc"] <= 1.0 and 0.0 <= r["eval_sampled_acc"] <= 1.0
    assert len(result.evals) == 3 and result.last_reward_mean == rows[-1]["reward_mean"]
    assert json.loads((out / "grpo_config.json").read_text())["lora_r"] == 4


def test_train_is_deterministic(run, tmp_path):
    _, out = run
    again = train(GRPOConfig(out=str(tmp_path), **TINY))
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if k != "seconds_per_step"} for l in text.splitlines()]  # noqa: E731, E741
    assert strip((out / "metrics.jsonl").read_text()) == strip((again.out / "metrics.jsonl").read_text())
    a = load_file(str(out / "step_2" / "adapter_model.safetensors"))
    b = load_file(str(again.out / "step_2" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_continue_from_an_adapter_of_another_rank_with_its_optimizer(run, tmp_path):
    _, out = run
    cfg = GRPOConfig(out=str(tmp_path), **{**TINY, "lora_r": 16, "steps": 1, "eval_prompts": 0},
                     init_adapter=str(out / "step_2"), resume_optimizer=str(out / "step_2"))
    result = train(cfg)
    start = load_file(str(tmp_path / "step_0" / "adapter_model.safetensors"))
    assert all(torch.equal(v, load_file(str(out / "step_2" / "adapter_model.safetensors"))[k]) for k, v in start.items())
    moved = load_file(str(result.checkpoints[-1] / "adapter_model.safetensors"))
    assert all(v.shape[0] == 4 for k, v in moved.items() if k.endswith("lora_A.weight"))  # rank 4 kept, not 16
    assert json.loads((tmp_path / "grpo_config.json").read_text())["lora_r"] == 4
    steps = load_file(str(tmp_path / "step_1" / OPTIMIZER_FILE))
    assert all(v.item() == 3.0 for k, v in steps.items() if k.endswith("::step"))  # 2 resumed + 1 new


def test_an_adapter_resumes_on_the_base_weights_of_init_model(run, tmp_path):
    """--init-model with --init-adapter: the adapter (of its own rank) loads on those base weights (a folded base)."""
    from nextrap.rl.grpo import load_policy

    _, out = run
    base = load_file(str(default_model_dir() / "model.safetensors"))
    key = next(k for k in base if k.endswith("layers.0.self_attn.q_proj.weight"))
    shutil.copytree(default_model_dir(), tmp_path / "folded")
    save_file({**base, key: base[key] + 0.25}, str(tmp_path / "folded" / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_policy(GRPOConfig(init_model=str(tmp_path / "folded"), init_adapter=str(out / "step_2")))
    layers = dict(model.named_modules())
    q = layers["base_model.model." + key.removesuffix(".weight")]
    assert torch.equal(q.base_layer.weight, base[key] + 0.25)
    adapter = load_file(str(out / "step_2" / "adapter_model.safetensors"))
    b_key = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_B" in k)
    assert torch.equal(q.lora_B["default"].weight, adapter[b_key]) and q.lora_B["default"].weight.shape[1] == 4


def test_jumps_every_k_steps_in_place_fold_to_the_live_base_and_keep_the_adapter_shape(tmp_path, monkeypatch):
    import nextrap.rl.grpo as grpo_module
    from conftest import model_state
    from nextrap.io.checkpoints import relative_name
    from nextrap.api.jumps import JUMPS, fold, jump_in_place

    live = []

    def keep_the_model(model, *args, **kwargs):  # the live model, to compare with the fold after training
        live.append(model)
        return jump_in_place(model, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "jump_in_place", keep_the_model)
    cfg = GRPOConfig(out=str(tmp_path / "run"), **{**TINY, "steps": 7, "eval_samples": 1}, jump_every=3, jump_method="linear",
                     jump_alpha="1.5", jump_horizon=1)
    result = train(cfg)
    # jumps at steps 3 and 6 (not at the last step), each fitted on the checkpoints since the previous one
    assert [(j["step"], j["method"], j["alpha"]) for j in result.jumps] == [(3, "linear", 1.5), (6, "linear", 1.5)]
    assert [j["fitted_steps"] for j in result.jumps] == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert all(j["seconds"] > 0 and j["backtest_error"] is not None for j in result.jumps)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "jump" in r] == [3, 6] and rows[3]["jump"]["saved"] == str(tmp_path / "run" / JUMPS / "step_3")
    # the adapter keeps its rank; the base moved by 1.5 (W_3 - W_2) and 1.5 (W_6 - W_5), each relative to its base
    shapes = [{k: v.shape for k, v in load_file(str(p / "adapter_model.safetensors")).items()} for p in result.checkpoints]
    assert all(s == shapes[0] for s in shapes) and len(shapes) == 8
    model = live[0]
    folded = model_state(fold(default_model_dir(), tmp_path / "run" / JUMPS, tmp_path / "folded").out)
    upto5 = model_state(fold(default_model_dir(), tmp_path / "run" / JUMPS, tmp_path / "folded5", upto=5).out)  # jump 3 only
    w0 = model_state(default_model_dir())
    layers = {relative_name(n) + ".weight": m for n, m in model.named_modules() if hasattr(m, "base_layer")}
    assert len(layers) == 28
    for key, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, folded[key]), key  # bit for bit
        assert not torch.equal(upto5[key], folded[key]) and not torch.equal(upto5[key], w0[key])


def test_alpha_by_reward_scores_every_candidate_on_prompts_held_out_of_training(tmp_path):
    from nextrap.rl.grpo import _resolve_data

    cfg = GRPOConfig(out=str(tmp_path / "run"), **{**TINY, "steps": 3, "eval_samples": 1}, jump_every=2, jump_method="linear",
                     jump_alpha="reward:0,1.5,40", jump_horizon=1, select_prompts=16)
    train_set, heldout, select, _ = _resolve_data(cfg)
    assert len(select) == 16 and len(train_set) == 9000 - 16 and not set(select) & (set(train_set) | set(heldout))
    result = train(cfg)
    (j,) = result.jumps
    assert set(j["scores"]) == {"0", "1.5", "40"} and j["alpha"] == max((0.0, 1.5, 40.0), key=lambda a: j["scores"][f"{a:g}"])
    assert 0 < j["score_seconds"] < j["seconds"]

    rows = "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": 2 * i}) + "\n" for i in range(10))
    (tmp_path / "d.jsonl").write_text(rows)
    cfg = GRPOConfig(out=str(tmp_path / "o"), **{**TINY, "steps": 1}, data=str(tmp_path / "d.jsonl"),
                     eval_data=str(tmp_path / "d.jsonl"), reward="nextrap.rl.tasks:math_reward", advantage="rloo")
    result = train(cfg)
    assert [p.name for p in result.checkpoints] == ["step_0", "step_1"] and result.evals[-1]["eval_prompts"] == 8


def test_init_model_and_config_errors(tmp_path):
    result = train(GRPOConfig(out=str(tmp_path / "a"), **{**TINY, "steps": 1, "eval_prompts": 0}, init_model=str(default_model_dir())))
    assert len(result.checkpoints) == 2
    with pytest.raises(GRPOError, match="multiple of save_every"):
        train(GRPOConfig(out=str(tmp_path / "b"), save_every=2, jump_every=3))
    (tmp_path / "not-peft").mkdir()
    with pytest.raises(GRPOError, match="not a PEFT adapter"):
        train(GRPOConfig(out=str(tmp_path / "c"), **TINY, init_adapter=str(tmp_path / "not-peft")))
    with pytest.raises(GRPOError, match="group_size"):
        train(GRPOConfig(out=str(tmp_path / "d"), group_size=1))
    with pytest.raises(GRPOError, match="unknown task"):
        train(GRPOConfig(out=str(tmp_path / "e"), task="chess"))
    assert not any((tmp_path / d).exists() for d in "bcde")  # refused before writing anything


# ---------------------------------------------------------------------------
# the CLI


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(grpo)
    return app


def test_cli_runs_and_prints_json(cli, tmp_path):
    out = tmp_path / "o"
    args = ["--out", str(out), "--steps", "1", "--save-every", "1", "--batch-prompts", "2", "--group-size", "2",
            "--lora-r", "2", "--target-modules", "q_proj, v_proj", "--eval-prompts", "4", "--eval-samples", "1",
            "--advantage", "reinforce++", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and len(summary["checkpoints"]) == 2
    assert summary["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert 0.0 <= summary["final_eval"]["eval_sampled_acc"] <= 1.0
    # a second run into the same folder is refused, then allowed with --overwrite
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "not empty" in again.stderr and "--overwrite" in again.stderr
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0
    # without --json: a readable summary (this path once raised NameError after a finished run)
    plain = CliRunner().invoke(cli, [a for a in args if a != "--json"] + ["--overwrite"])
    assert plain.exit_code == 0, plain.output
    assert "adapters in" in plain.stderr and "held-out accuracy at step 1" in plain.stderr


SMALL = ["--steps", "1", "--save-every", "1", "--batch-prompts", "2", "--group-size", "2", "--eval-every", "0", "--lora-r", "2"]


def _tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_overwrite_keeps_every_file_of_a_folder_nextrap_grpo_did_not_mark(cli, tmp_path):
    """A copy of a trajectory with the user's own metrics.jsonl, or a run of an older nextrap: no marker, so
    --overwrite deletes nothing and says how to go on."""
    mine = tmp_path / "mine"
    (mine / "step_0").mkdir(parents=True)
    (mine / "step_0" / "adapter_config.json").write_text("{}")
    (mine / "metrics.jsonl").write_text('{"step": 0, "mine": true}\n')
    before = _tree(mine)
    r = CliRunner().invoke(cli, ["--out", str(mine), *SMALL, "--overwrite"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "not an output of nextrap" in r.stderr and "delete it yourself, or choose another --out" in r.stderr
    assert _tree(mine) == before


def test_resuming_a_run_into_its_own_folder_is_refused_before_its_checkpoint_is_deleted(cli, tmp_path):
    ws = tmp_path / "ws"
    assert CliRunner().invoke(cli, ["--out", str(ws), *SMALL]).exit_code == 0
    assert (ws / ".nextrap-output.json").is_file()  # marked when it was made: a later --overwrite may replace it
    before = _tree(ws)
    resume = ["--init-adapter", str(ws / "step_1"), "--resume-optimizer", str(ws / "step_1")]
    r = CliRunner().invoke(cli, ["--out", str(ws), *SMALL, *resume, "--overwrite"])
    assert r.exit_code == 1 and f"--out {ws}: holds --init-adapter {ws / 'step_1'}" in r.stderr
    assert _tree(ws) == before
    (ws / "notes.txt").write_text("mine")  # something the run did not write: no longer provably a run
    r = CliRunner().invoke(cli, ["--out", str(ws), *SMALL, "--overwrite"])
    assert r.exit_code == 1 and f"{ws / 'notes.txt'} was not written by nextrap" in r.stderr
    assert (ws / "notes.txt").read_text() == "mine" and (ws / "step_1" / OPTIMIZER_FILE).is_file()


def test_an_out_holding_its_data_or_inside_its_model_is_refused(cli, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    r = CliRunner().invoke(cli, ["--out", str(tmp_path / "o"), *SMALL, "--data", str(tmp_path / "o" / "train.jsonl")])
    assert r.exit_code == 1 and "holds --data" in r.stderr
    (tmp_path / "model").mkdir()
    r = CliRunner().invoke(cli, ["--out", str(tmp_path / "model" / "run"), *SMALL, "--model", str(tmp_path / "model")])
    assert r.exit_code == 1 and "is inside --model" in r.stderr and not (tmp_path / "model" / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--advantage", "ppo"], "unknown advantage"),
        (["--reward", "nope"], "expected module:function"),
        (["--data", "/nonexistent.jsonl"], "no such file"),
        (["--init-adapter", "/nonexistent-adapter"], "no such folder"),
        (["--jump-alpha", "reward:0.5,1.5"], "needs held-out prompts"),
        (["--jump-method", "magic", "--jump-every", "10"], "jump_method magic"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(cli, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["--out", str(tmp_path / "o"), "--steps", "1", *args])
    assert r.exit_code == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_help_lists_the_options(cli):
    r = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for option in ("--model", "--init-adapter", "--advantage", "--eval-samples", "--overwrite", "--json", "--jump-every",
                   "--jump-alpha", "--select-prompts"):
        assert option in r.output


def test_the_embedded_default_model_ships_inside_the_wheel(tmp_path):
    """`nextrap grpo` without --model must work from an installed wheel, not only from a checkout."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import nextrap
    from nextrap.rl.grpo import default_model_dir

    folder = default_model_dir()
    assert Path(nextrap.__file__).parent in folder.parents
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("nextrap-*.whl"))).namelist()
    for f in folder.iterdir():
        assert f"nextrap/embedded/addition-lm/{f.name}" in names
