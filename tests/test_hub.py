"""``nextrap push`` against a fake HfApi: no test touches the network."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import nextrap
import nextrap.api.hub as hub
from conftest import tree_digest
from nextrap.cli import app
from nextrap.core.errors import NextrapError
from nextrap.api.hub import build_card, hub_model_id, push

runner = CliRunner()
SECRET = "hf_FAKEtokenVALUE0123456789abcdefXYZ"


class FakeApi:
    """Records HfApi calls; upload_folder snapshots the staged folder (files and README) while it exists."""

    instances: list["FakeApi"] = []

    def __init__(self, token=None, fail_on=None):
        self.token, self.fail_on = token, fail_on
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.staged: Path | None = None
        FakeApi.instances.append(self)

    def _record(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))
        if name == self.fail_on:
            raise RuntimeError(f"401 Client Error: Unauthorized for token {self.token}\nsecond line")

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", args, kwargs)
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        self.staged = Path(kwargs["folder_path"])
        self._record("upload_folder", args, kwargs)
        self.uploaded = {p.relative_to(self.staged).as_posix(): p.read_bytes()
                         for p in sorted(self.staged.rglob("*")) if p.is_file()}

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"
        return Info()


class NoCallsApi:
    def __getattr__(self, name):
        raise AssertionError(f"dry run called the API: {name}")


@pytest.fixture(scope="module")
def jumped(fitted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jumped") / "alpha"
    nextrap.extend(fitted, [1.5], out, method="next")
    return out


@pytest.fixture
def folder(jumped, tmp_path) -> Path:
    """A private copy of the jumped folder, with a README.md of its own (as PEFT's save_pretrained writes)."""
    dst = tmp_path / "jumped"
    shutil.copytree(jumped, dst)
    (dst / "README.md").write_text("PEFT's default card\n")
    return dst


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_creates_repo_branch_and_uploads_card_without_touching_input(folder):
    before = tree_digest(folder)
    api = FakeApi()
    res = push(folder, "org/jumped-model", private=True, revision="exp-1", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    name, args, kwargs = api.calls[0]
    assert args == ("org/jumped-model",) and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][2]["branch"] == "exp-1" and api.calls[1][2]["exist_ok"] is True
    up = api.calls[2][2]
    assert up["repo_id"] == "org/jumped-model" and up["revision"] == "exp-1" and "step 160" in up["commit_message"]
    # the upload: the folder's files, its own README replaced by the generated card
    assert set(api.uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "nextrap.json",
                                 "prediction.safetensors"}
    assert api.uploaded["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    card = api.uploaded["README.md"].decode()
    assert card == res.card and "PEFT's default card" not in card
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["tags"] == ["nextrap", "rlvr", "extrapolation", "next"]
    info = json.loads((folder / "nextrap.json").read_text())
    for b in info["backtest"]:  # the backtest table
        assert f"| {b['method']} | {b['from_step']} | {b['to_step']} | {b['error']:.3f} | {b['cosine']:+.3f} |" in card
    assert "| alpha (jump size) | 1.5 |" in card and "| jumped from step | 160 |" in card and "| horizon | 5 checkpoints |" in card
    assert "steps 0, 10, 20" in card and "PeftModel.from_pretrained" in card and 'revision="exp-1"' in card
    # nothing written into the input; the staging folder is gone
    assert tree_digest(folder) == before
    assert not api.staged.exists()
    assert res.calls == ["create_repo", "create_branch", "upload_folder"]
    assert res.repo_url == "https://huggingface.co/org/jumped-model" and res.commit_url.endswith("/commit/abc123")
    assert dict(res.files)["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").stat().st_size


def test_main_branch_needs_no_create_branch(folder):
    api = FakeApi()
    push(folder, "org/m", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is False and api.calls[1][2]["revision"] is None


def test_dry_run_makes_no_api_calls_and_lists_files(folder):
    before = tree_digest(folder)
    res = push(folder, "org/m", dry_run=True, api=NoCallsApi())
    assert res.dry_run and res.calls == [] and res.repo_url is None
    files = dict(res.files)
    assert files["README.md"] == len(res.card.encode()) and files["nextrap.json"] == (folder / "nextrap.json").stat().st_size
    assert tree_digest(folder) == before


def test_not_a_nextrap_output_is_an_error(folder, tmp_path, fitted):
    (tmp_path / "plain").mkdir()
    with pytest.raises(NextrapError, match="no nextrap.json"):
        push(tmp_path / "plain", "org/m", dry_run=True)
    sweep = tmp_path / "sweep"
    nextrap.extend(fitted, [1.0, 2.0], sweep)
    with pytest.raises(NextrapError, match="push one alpha-X subfolder"):
        push(sweep, "org/m", dry_run=True)
    with pytest.raises(NextrapError, match="not a folder"):
        push(tmp_path / "missing", "org/m", dry_run=True)
    with pytest.raises(NextrapError, match="--repo"):
        push(folder, "not a/valid/repo", dry_run=True)


def test_api_errors_become_one_line_and_staging_is_removed(folder):
    api = FakeApi(token=SECRET, fail_on="upload_folder")
    with pytest.raises(NextrapError) as e:
        push(folder, "org/m", api=api)
    assert "upload_folder failed" in str(e.value) and "401" in str(e.value) and "\n" not in str(e.value)
    assert not api.staged.exists()


def test_api_errors_scrub_the_resolved_token(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(hub, "HfApi", lambda token=None: FakeApi(token=token, fail_on="create_repo"))
    with pytest.raises(NextrapError) as e:
        push(folder, "org/m")
    assert SECRET not in str(e.value) and "***" in str(e.value)


def test_card_base_model_and_library(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-base").mkdir()
    assert hub_model_id("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"
    assert hub_model_id("local-base") is None and hub_model_id("/abs/path/model") is None and hub_model_id(None) is None
    merged = tmp_path / "merged"
    merged.mkdir()
    info = {"method": "linear", "format": "merged", "alpha": 2.0, "from_step": 40, "horizon": 3, "source_steps": [10, 20, 30, 40],
            "base": "/data/models/qwen", "backtest": []}
    card = str(build_card(merged, info, "org/m"))
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["tags"][-1] == "linear" and "base_model" not in meta
    assert "AutoModelForCausalLM.from_pretrained(\"org/m\")" in card and "No backtest was run" in card
    assert "/data/models/qwen" in card  # the local base is named in the text, not as Hub metadata
    assert _front_matter(str(build_card(merged, info, "org/m", base_model="Qwen/Qwen2.5-1.5B")))["base_model"] == "Qwen/Qwen2.5-1.5B"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    meta = _front_matter(str(build_card(adapter, {**info, "format": "adapter", "base": None}, "org/m")))
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["library_name"] == "peft"


# ------------------------------------------------------------------ CLI, with HfApi replaced by the fake

def _all_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_cli_push_json_uses_the_token_but_never_shows_it(folder, monkeypatch):
    FakeApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--revision", "b1", "--private", "--json"],
                        env={"HF_TOKEN": SECRET})
    assert res.exit_code == 0, res.output
    api = FakeApi.instances[-1]
    assert api.token == SECRET  # handed to HfApi ...
    out = json.loads(res.stdout)
    assert out["repo"] == "org/m" and out["revision"] == "b1" and out["private"] is True and out["dry_run"] is False
    assert out["calls"] == ["create_repo", "create_branch", "upload_folder"] and "README.md" in [f["path"] for f in out["files"]]
    # ... and nowhere else: not on stdout/stderr, not in the upload, not in the input folder
    assert SECRET not in res.stdout and SECRET not in res.stderr
    assert all(SECRET.encode() not in data for data in api.uploaded.values())
    assert SECRET not in _all_text(folder)
    assert not any(SECRET in repr(c) for c in api.calls)


def test_cli_push_custom_token_env_and_human_output(folder, monkeypatch):
    FakeApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--token-env", "MY_HF"], env={"MY_HF": SECRET, "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert FakeApi.instances[-1].token == SECRET and SECRET not in res.output
    assert "uploaded to org/m" in res.output and "adapter_model.safetensors" in res.output and "commit/abc123" in res.output


def test_cli_dry_run_prints_files_and_card(folder, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", lambda *a, **k: NoCallsApi())
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--dry-run"], env={"HF_TOKEN": SECRET, "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("would upload", "README.md", "prediction.safetensors", "library_name: peft", "## Backtest", "dry run"):
        assert text in res.output, text
    assert SECRET not in res.output
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--dry-run", "--json"], env={"HF_TOKEN": SECRET})
    out = json.loads(res.stdout)
    assert out["dry_run"] is True and out["calls"] == [] and out["card"].startswith("---\n") and SECRET not in res.stdout


def test_cli_missing_token_and_bad_folder_are_one_line_errors(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no cached login either
    monkeypatch.setattr(hub, "HfApi", lambda *a, **k: NoCallsApi())
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--token-env", "NEXTRAP_TEST_NO_SUCH_VAR"])
    assert res.exit_code == 1 and "no Hugging Face token" in res.stderr and "$NEXTRAP_TEST_NO_SUCH_VAR" in res.stderr
    (tmp_path / "plain").mkdir()
    res = runner.invoke(app, ["push", str(tmp_path / "plain"), "--repo", "org/m"])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "nextrap.json" in lines[0]


def test_the_card_of_a_base_format_output_loads_checkpoint_c_on_it(tmp_path):
    """--format base is W_0 + alpha * move: the card says to load checkpoint c's own adapter on it, naming the step."""
    folder = tmp_path / "folded"
    folder.mkdir()
    info = {"method": "next", "format": "base", "alpha": 1.5, "from_step": 160, "horizon": 5, "source_steps": [150, 160],
            "base": "/data/models/tiny", "backtest": [],
            "resume_from": {"path": "/runs/r1/checkpoint-160", "step": 160}}
    card = str(build_card(folder, info, "org/folded"))
    assert _front_matter(card)["library_name"] == "transformers"
    assert 'base = AutoModelForCausalLM.from_pretrained("org/folded")' in card
    assert 'PeftModel.from_pretrained(base, "/runs/r1/checkpoint-160", is_trainable=True)' in card
    assert "checkpoint of step 160" in card and "resume_from" in card
    assert 'model = AutoModelForCausalLM.from_pretrained("org/folded")' not in card  # not the jumped model alone
    with pytest.raises(NextrapError, match="--format base output without resume_from"):
        build_card(folder, {**info, "resume_from": None}, "org/folded")


def test_a_nextrap_json_of_wrong_types_is_a_one_line_error(folder):
    info = json.loads((folder / "nextrap.json").read_text())
    for key, value, field in (("source_steps", 160, "source_steps is a int"), ("describes", "LoRA", "describes is a str"),
                              ("backtest", [1], "backtest entry is not an object"), ("alpha", "1.5", "alpha is a str")):
        (folder / "nextrap.json").write_text(json.dumps({**info, key: value}))
        with pytest.raises(NextrapError, match=f"nextrap.json: not a valid nextrap extend record .*{field}"):
            push(folder, "org/m", dry_run=True)
    (folder / "nextrap.json").write_text("[1, 2]")
    res = runner.invoke(app, ["push", str(folder), "--repo", "org/m", "--dry-run"])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "not a JSON object" in lines[0]
