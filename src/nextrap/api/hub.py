"""``nextrap push``: upload a jumped checkpoint (an ``extend`` output folder) to the Hugging Face Hub with a
model card that records where it came from (source steps, method, alpha, horizon, backtest).

The folder itself is never modified: the upload is staged in a temporary folder of links to its files plus
the generated ``README.md`` (which replaces any README the folder holds, e.g. PEFT's default card). The
token is read from an environment variable or huggingface_hub's cached login and only ever handed to
``HfApi``; it is never printed, logged or written. ``push(..., api=...)`` takes any object with HfApi's
``create_repo`` / ``create_branch`` / ``upload_folder`` so that tests run without a network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from nextrap.core.errors import NextrapError
from nextrap.core.registry import SUMMARY
from nextrap.io.files import read_json
from nextrap.trajectories.lora import LoraRun

PROVENANCE = "nextrap.json"  # written by ``extend`` into every jumped folder
CARD = "README.md"
TAGS = ["nextrap", "rlvr", "extrapolation"]


@dataclass
class PushResult:
    """What was (or, with ``dry_run``, would be) uploaded; ``to_json`` is ``nextrap push --json``."""

    folder: Path
    repo: str
    revision: str | None
    private: bool
    dry_run: bool
    files: list[tuple[str, int]]  # (path in the repo, bytes), README.md included
    card: str
    repo_url: str | None = None
    commit_url: str | None = None
    calls: list[str] = field(default_factory=list)  # the API calls made, in order

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "repo": self.repo, "revision": self.revision, "private": self.private,
                "dry_run": self.dry_run, "files": [{"path": p, "bytes": b} for p, b in self.files],
                "total_bytes": self.total_bytes, "repo_url": self.repo_url, "commit_url": self.commit_url,
                "calls": self.calls, "card": self.card}


def resolve_token(token_env: str = "HF_TOKEN") -> str | None:
    """The token in ``$token_env``, else huggingface_hub's cached login (``hf auth login``), else None."""
    value = os.environ.get(token_env, "").strip()
    return value or get_token()


def hub_model_id(name: Any) -> str | None:
    """``name`` if it can be a Hub model id (``org/name``, not a local folder), else None."""
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def upload_files(folder: Path) -> list[tuple[str, Path]]:
    """The files ``push`` uploads from ``folder``: every file but hidden ones and the folder's own README.md."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != CARD:
            out.append((rel.as_posix(), p))
    return out


def _backtest_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No backtest was run (the fit had fewer than 2h + 1 checkpoints, or `--no-backtest`).\n"
    lines = ["| method | fitted on steps <= | predicted step | error e | cosine |", "|---|---|---|---|---|"]
    for b in rows:
        lines.append(f"| {b.get('method')} | {b.get('from_step')} | {b.get('to_step')} | {_num(b.get('error'), '.3f')} | "
                     f"{_num(b.get('cosine'), '+.3f')} |")
    return ("\n".join(lines) + "\n\n`e = ||W_hat - W_true|| / ||W_from - W_true||` (Frobenius, all jumped weights together): e < 1 means the "
            "jump landed closer to the true later checkpoint than not jumping; `oracle-rank1` is the ceiling for any "
            "rank-1 predictor. Measured on the source run itself with alpha 1.\n")


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _is_merged(folder: Path, info: dict[str, Any]) -> bool:
    """Whether the folder holds a whole model (merged, or ``--format base``'s folded base) rather than an adapter."""
    if info.get("format") in ("adapter", "merged", "base"):
        return info["format"] != "adapter"
    return not (folder / "adapter_config.json").is_file()


# nextrap.json's fields the card reads, with the types extend writes (None: absent or null is fine too)
_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,), "format": (str,), "kind": (str,), "base": (str,), "alpha": (int, float), "from_step": (int,),
    "horizon": (int,), "source_steps": (list,), "backtest": (list,), "describes": (dict,), "resume_from": (dict,)}


def check_provenance(file: Path, info: Any) -> None:
    """Refuse a nextrap.json the card cannot be written from, naming the file and the field."""
    def bad(what: str) -> NoReturn:
        raise NextrapError(f"{file}: not a valid nextrap extend record ({what})")

    if not isinstance(info, dict):
        bad("not a JSON object")
    for key, kinds in _FIELDS.items():
        value = info.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            bad(f"{key} is a {type(value).__name__}, not a {' or '.join(k.__name__ for k in kinds)}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in info.get("source_steps") or []):
        bad("source_steps are not all integers")
    if not all(isinstance(b, dict) for b in info.get("backtest") or []):
        bad("a backtest entry is not an object")
    describes = info.get("describes") or {"source": "", "format": ""}
    if not (isinstance(describes.get("source"), str) and isinstance(describes.get("format"), str)):
        bad("describes needs source and format as text")
    resume = info.get("resume_from") or {}
    if resume and not (isinstance(resume.get("path"), str) and isinstance(resume.get("step"), int)):
        bad("resume_from needs a path and a step")
    if info.get("format") == "base" and not resume:
        bad("a --format base output without resume_from")


def build_card(folder: Path, info: dict[str, Any], repo: str, revision: str | None = None,
               base_model: str | None = None) -> ModelCard:
    """The model card of a jumped checkpoint, from its ``nextrap.json`` (``info``) and adapter_config.json."""
    check_provenance(folder / PROVENANCE, info)
    merged = _is_merged(folder, info)
    adapter_base = None
    if not merged and (folder / "adapter_config.json").is_file():
        config = read_json(folder / "adapter_config.json")
        adapter_base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    base_text = base_model or info.get("base") or adapter_base
    base_id = hub_model_id(base_model) or hub_model_id(info.get("base")) or hub_model_id(adapter_base)
    method = str(info.get("method", "unknown"))
    data = ModelCardData(base_model=base_id, library_name="transformers" if merged else "peft",
                         tags=TAGS + ([method] if method not in TAGS else []))
    steps = info.get("source_steps") or []
    alpha, from_step, horizon = info.get("alpha"), info.get("from_step"), info.get("horizon")
    # how extend described what it read and wrote; a nextrap.json from before it did so was written from LoRA
    describes = info.get("describes") or {"source": LoraRun.checkpoint_text,
                                          "format": LoraRun.formats["merged" if merged else "adapter"]}
    rev = f', revision="{revision}"' if revision else ""
    base_ref = base_id or "BASE_MODEL"
    if info.get("format") == "base":  # W_0 + alpha * move: the jumped model is this base plus checkpoint c's adapter
        resume = info["resume_from"]
        load = (f"This repo holds the base model with the jump folded in (`W_0 + alpha * move`), not the jumped model "
                f"itself: load it, then the run's own LoRA checkpoint of step {resume['step']} on it (`nextrap.json`'s "
                f"`resume_from`, saved at `{resume['path']}` where this was written), and resume training from that "
                "checkpoint (its adapter, optimizer and schedule).\n\n"
                "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{repo}"{rev})  # W_0 + alpha * move\n'
                f'model = PeftModel.from_pretrained(base, "{resume["path"]}", is_trainable=True)'
                f"  # the run's checkpoint of step {resume['step']}\n```\n")
    elif merged:
        load = ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev})\n```\n')
    else:
        load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")\n'
                f'model = PeftModel.from_pretrained(base, "{repo}"{rev}, is_trainable=True)  # continue RLVR from here\n```\n')
    body = [
        f"# {repo.split('/')[-1]}\n",
        f"An extrapolated RLVR checkpoint written by nextrap (`nextrap extend`): the run's {describes['source']} "
        f"at step {from_step} moved ahead by alpha = {alpha} times the predicted move over {horizon} "
        "checkpoints, meant as the starting point for more RL training, not as a finished model.\n",
        "## Provenance\n",
        "| | |\n|---|---|",
        f"| method | `{method}`: {SUMMARY.get(method, 'see the nextrap README')} |",
        f"| alpha (jump size) | {alpha} |",
        f"| jumped from step | {from_step} |",
        f"| horizon | {horizon} checkpoints |",
        f"| source checkpoints | {len(steps)}: steps {', '.join(str(s) for s in steps)} |",
        f"| format | {describes['format']} |",
        f"| base model | {base_text if base_text else 'not recorded'} |",
        "",
        "## Backtest on the source run\n",
        _backtest_table(list(info.get("backtest") or [])),
        "## How to load\n",
        load,
    ]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))
    return card


def _first_line(e: BaseException, secret: str | None) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.replace(secret, "***") if secret else text


def push(folder: Path | str, repo: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
         token_env: str = "HF_TOKEN", commit_message: str | None = None, base_model: str | None = None,
         api: HfApi | Any | None = None) -> PushResult:
    """Upload ``folder`` (a ``nextrap extend`` output) to the Hub model repo ``repo`` with a generated card.

    Creates the repo (``exist_ok``; ``private`` applies only to a new repo) and, for a ``revision`` other than
    main, the branch; then one ``upload_folder`` commit. ``dry_run`` makes no API call and needs no token.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NextrapError(f"{folder}: not a folder")
    if not (folder / PROVENANCE).is_file():
        hint = " (several alphas were written: push one alpha-X subfolder)" if any(folder.glob(f"alpha-*/{PROVENANCE}")) else ""
        raise NextrapError(f"{folder}: no {PROVENANCE}, so not a nextrap extend output{hint}")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise NextrapError(f"--repo {repo!r}: not a valid Hub repo id (use ORG/NAME)") from None
    info = read_json(folder / PROVENANCE)
    card = str(build_card(folder, info, repo, revision, base_model))
    files = upload_files(folder)
    listing = sorted([(rel, p.stat().st_size) for rel, p in files] + [(CARD, len(card.encode("utf-8")))])
    result = PushResult(folder, repo, revision, private, dry_run, listing, card)
    if dry_run:
        return result
    token = None
    if api is None:
        token = resolve_token(token_env)
        if not token:
            raise NextrapError(f"no Hugging Face token: set ${token_env} or log in with `hf auth login`")
        api = HfApi(token=token)
    message = commit_message or (f"nextrap: {info.get('method')} jump, alpha {info.get('alpha')}, "
                                 f"from step {info.get('from_step')}")
    staging = Path(tempfile.mkdtemp(prefix="nextrap-push-"))
    try:
        for rel, src in files:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(src.absolute(), dst)
            except OSError:  # no symlinks here (e.g. Windows without the privilege): copy instead
                shutil.copy2(src, dst)
        (staging / CARD).write_text(card, encoding="utf-8")
        step = "create_repo"
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            result.calls.append(step)
            result.repo_url = str(url) if url is not None else None
            if revision and revision != "main" and not revision.startswith("refs/"):
                step = "create_branch"
                api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
                result.calls.append(step)
            step = "upload_folder"
            commit = api.upload_folder(folder_path=str(staging), repo_id=repo, repo_type="model", revision=revision,
                                       commit_message=message)
            result.calls.append(step)
        except NextrapError:
            raise
        except Exception as e:  # noqa: BLE001 - network, auth and Hub errors all become one line
            raise NextrapError(f"{repo}: {step} failed: {_first_line(e, token)}") from None
        commit_url = getattr(commit, "commit_url", None)
        result.commit_url = str(commit_url) if commit_url else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
