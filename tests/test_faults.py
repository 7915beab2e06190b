"""Faults: every bad input, unreadable file, full disk, odd output location and interrupt ends with one line on
stderr naming the file (or the option), exit 1 (128 + the signal for SIGINT and SIGTERM), the inputs unchanged
and nothing written anywhere; outputs get the umask's permissions and the same bytes on every run.

Most cases run the CLI in this process (typer's CliRunner). Those about the process itself run the `nextrap`
command in a subprocess, from the entry point pyproject.toml declares: signals at start-up, mid-pass and while
writing; the umask; unreadable files (root, which reads anything, runs them without its DAC capabilities).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import BASE, FAST_EPOCHS, TRAJECTORY, tree_digest
from nextrap.cli import app
from nextrap.io.files import PAUSE_ENV
from test_fullparam import make_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def snapshot(folder: Path) -> list[str]:
    """Every path below ``folder`` (links not followed; unreadable folders as they are)."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in dirs + files)


def fails(args: list, workdir: Path, *names: object, inputs: tuple[Path, ...] = ()) -> str:
    """Run the CLI expecting exit 1 and one ``error:`` line that names every one of ``names``, with nothing
    written under ``workdir`` (which holds the output) and the ``inputs`` unchanged; returns the line."""
    before, digests = snapshot(workdir), [tree_digest(p) for p in inputs]
    res = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in res.output and "\x1b" not in res.output
    assert snapshot(workdir) == before and [tree_digest(p) for p in inputs] == digests
    return lines[0]


# --- output locations ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["fit", "extend", "pipeline", "grpo"])
def test_an_output_under_a_file_is_refused_before_any_work(command, trajectory, fitted, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile / "out"
    for module, expensive in {"api.fit": "open_trajectory", "api.extend": "load_fit", "rl.pipeline": "train",
                              "rl.grpo": "train"}.items():
        monkeypatch.setattr(importlib.import_module(f"nextrap.{module}"), expensive,
                            lambda *a, **k: pytest.fail("worked before checking --out"))
    args = {"fit": ["fit", trajectory, "--out", out],
            "extend": ["extend", "--fit", fitted, "--alpha", "1", "--out", out],
            "pipeline": ["pipeline", "--out", out],
            "grpo": ["grpo", "--out", out, "--steps", "1"]}[command]
    line = fails(args, tmp_path, "--out", afile, inputs=(trajectory,))
    assert "not a folder" in line


# --- unreadable inputs (a subprocess: root reads anything unless it drops its DAC capabilities) ---------------

# Runs several CLI invocations in one process (one start-up): [umask or null, args] -> exit code and stderr.
DRIVER = """
import json, os, sys
from typer.testing import CliRunner
from nextrap.cli import app
results = []
for mask, args in json.loads(sys.argv[1]):
    if mask is not None:
        os.umask(mask)
    r = CliRunner().invoke(app, args)
    results.append({"code": r.exit_code, "stderr": r.stderr, "output": r.output})
print(json.dumps(results))
"""


def _without_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so root obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def drive(runs: list, obey_modes: bool = False) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True, env=env,
                              timeout=300, preexec_fn=_without_dac_override if obey_modes and os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop root's DAC capabilities here ({e})")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_unreadable_checkpoints_say_permission_denied(tmp_path):
    blocked = {  # made unreadable, one per copy of the trajectory: each must be named with "permission denied"
        "folder": lambda run: run, "step folder": lambda run: run / "step_70",
        "weights": lambda run: run / "step_100" / "adapter_model.safetensors",
        "config": lambda run: run / "step_100" / "adapter_config.json"}
    runs = [shutil.copytree(TRAJECTORY, tmp_path / f"run-{what.replace(' ', '-')}") for what in blocked]
    paths = [pick(run) for pick, run in zip(blocked.values(), runs)]
    digests, before = [tree_digest(run) for run in runs], snapshot(tmp_path)
    for path in paths:
        path.chmod(0)
    try:
        results = drive([[None, ["fit", str(run), "--out", str(tmp_path / f"fit-{run.name}"), "--methods", "linear", "--json"]]
                         for run in runs], obey_modes=True)
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    for path, result in zip(paths, results):
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert result["code"] == 1 and len(lines) == 1, result
        assert f"{path}: permission denied" in lines[0] and "Traceback" not in result["output"], lines
    assert [tree_digest(run) for run in runs] == digests and snapshot(tmp_path) == before


# --- damaged fit folders ----------------------------------------------------------------------------------------

def _drop_bytes(m: dict) -> None:
    del m["inputs"][0]["files"][0]["bytes"]


def _no_terms(m: dict) -> None:
    del m["summary"]["backtest"][0]["terms"]


@pytest.mark.parametrize("damage", [_drop_bytes, _no_terms, lambda m: m.update(steps="all"), lambda m: m.update(inputs=[7]),
                                    lambda m: m.pop("source")], ids=["no bytes", "no terms", "steps", "inputs", "source"])
def test_a_damaged_manifest_is_blamed_on_the_fit_folder_not_the_checkpoints(damage, fitted, tmp_path):
    fit = shutil.copytree(fitted, tmp_path / "fit")
    manifest = json.loads((fit / "manifest.json").read_text())
    damage(manifest)
    (fit / "manifest.json").write_text(json.dumps(manifest))
    line = fails(["extend", "--fit", fit, "--alpha", "1", "--method", "linear", "--out", tmp_path / "out"], tmp_path,
                 fit / "manifest.json", "not a valid nextrap fit manifest")
    assert "refit" not in line


def test_a_checkpoint_folder_given_as_the_fit_folder_is_named_as_such(trajectory, tmp_path):
    fails(["extend", "--fit", trajectory, "--alpha", "1", "--out", tmp_path / "out"], tmp_path,
          f"{trajectory}: this is a checkpoint folder, not a fit folder", "nextrap fit", inputs=(trajectory,))


# --- numbers ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,named", [("1e300", "--alpha 1e+300"), ("1e100", "NaN or Inf")])
def test_an_alpha_that_overflows_is_refused(alpha, named, fitted, tmp_path):
    fails(["extend", "--fit", fitted, f"--alpha={alpha}", "--method", "linear", "--out", tmp_path / "out"], tmp_path,
          named, inputs=(fitted,))


def test_nan_in_a_full_parameter_checkpoint_names_the_file_and_parameter(tmp_path):
    run = make_run(tmp_path / "run", steps=[0, 10, 20, 30])
    weights = run / "step_30" / "model.safetensors"
    sd = load_file(str(weights))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name][1, 2] = float("nan")
    save_file(sd, str(weights), metadata={"format": "pt"})
    fails(["fit", run, "--base", BASE, "--horizon", "1", "--methods", "linear", "--json", "--out", tmp_path / "fit"],
          tmp_path, f"{weights}: parameter {name} contains NaN or Inf", inputs=(run,))


# --- full disk ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 32 KB tmpfs (root only): smaller than any fit, adapter or merged model of the fixtures."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (test_full_disk_while_writing_is_one_line covers the message)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("command", ["fit", "extend adapter", "extend merged"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, small_disk, trajectory, fitted, tmp_path):
    out = small_disk / "out"
    args = {"fit": ["fit", trajectory, "--methods", "linear", "--json"],
            "extend adapter": ["extend", "--fit", fitted, "--alpha", "1", "--method", "linear"],
            "extend merged": ["extend", "--fit", fitted, "--alpha", "1", "--method", "linear", "--format", "merged",
                              "--base", BASE]}[command]
    fails([*args, "--out", out], tmp_path, f"no space left on device writing {out}", inputs=(trajectory, fitted))
    assert os.listdir(small_disk) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), "safetensors"])
def test_full_disk_while_writing_is_one_line(error, fitted, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    if error == "safetensors":  # what safetensors' Rust writer raises
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr("nextrap.writers.adapter.write_safetensors", full)
    fails(["extend", "--fit", fitted, "--alpha", "1", "--method", "linear", "--out", tmp_path / "out"], tmp_path,
          f"no space left on device writing {tmp_path / 'out'}", inputs=(fitted,))


# --- pickles, legacy files, trainer layouts ----------------------------------------------------------------------

class _Runs:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload,named", [(_Runs(), "posix.system"), (__import__("fractions").Fraction(1, 3), "fractions.Fraction")])
def test_a_refused_pickle_is_one_clean_sentence(payload, named, trajectory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = trajectory / "step_70"
    tensors = load_file(str(step / "adapter_model.safetensors"))
    (step / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "extra": payload}, step / "adapter_model.bin")
    line = fails(["fit", trajectory, "--out", tmp_path / "fit"], tmp_path, step / "adapter_model.bin",
                 f"refused: it pickles {named}", inputs=(trajectory,))
    assert line.endswith("save the adapter as safetensors") and not (tmp_path / "pwned").exists()


def test_a_legacy_torch_bin_is_read(trajectory, tmp_path):
    step = trajectory / "step_160"
    tensors = load_file(str(step / "adapter_model.safetensors"))
    (step / "adapter_model.safetensors").unlink()
    torch.save(tensors, step / "adapter_model.bin", _use_new_zipfile_serialization=False)  # not a zip: no mmap
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--methods", "linear", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"][-1] == 160


def _trl_run(root: Path, steps: list[int]) -> Path:
    """TRL's layout (checkpoint-N) from the fixture trajectory's step folders."""
    for step in steps:
        shutil.copytree(TRAJECTORY / f"step_{step}", root / f"checkpoint-{step}")
    return root


def test_too_few_trl_checkpoints_hint_at_save_total_limit(tmp_path):
    run = _trl_run(tmp_path / "run", [100, 110, 120])
    fails(["fit", run, "--out", tmp_path / "fit"], tmp_path, f"{run}: 3 checkpoints", "save_total_limit", inputs=(run,))


def test_trl_off_grid_final_checkpoint_is_skipped_with_a_note(tmp_path):
    run = _trl_run(tmp_path / "run", [10, 20, 30, 40, 50])
    shutil.copytree(TRAJECTORY / "step_60", run / "checkpoint-55")  # max_steps 55, save_steps 10
    res = runner.invoke(app, ["fit", str(run), "--out", str(tmp_path / "fit"), "--horizon", "1", "--methods", "linear", "--json"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and f"{run / 'checkpoint-55'}: step 55 is off the 10-step grid" in lines[0]
    assert json.loads(res.stdout)["steps"] == [10, 20, 30, 40, 50]



# --- interrupts (subprocesses of the `nextrap` command) ------------------------------------------------------------

def command_script(folder: Path) -> Path:
    """The `nextrap` console script as pip writes it for the entry point pyproject.toml declares."""
    module, func = re.search(r'^nextrap = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M).groups()
    script = folder / "bin" / "nextrap"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                      f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit({func}())\n")
    return script


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.01)


def _importing_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps to catch the start-up")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["start-up", "mid-pass", "writing"])
def test_an_interrupt_exits_128_plus_signal_with_one_line_and_leaves_nothing(moment, sig, trajectory, fitted, tmp_path):
    """start-up: while torch is being imported; mid-pass: while next-paper trains (its progress bar is drawn on
    a terminal); writing: while the output is in its temporary folder (held open by the PAUSE_ENV test hook)."""
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    out = outdir / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", "TERM": "xterm", PAUSE_ENV: "600"}
    args = {"start-up": ["fit", trajectory, "--out", out],
            "mid-pass": ["fit", trajectory, "--out", out, "--methods", "next-paper", "--epochs", "10000000"],
            "writing": ["extend", "--fit", fitted, "--alpha", "1", "--method", "linear", "--format", "merged",
                        "--base", BASE, "--out", out]}[moment]
    digests = [tree_digest(trajectory), tree_digest(fitted)]
    master, terminal = os.openpty()  # stderr on a terminal: rich draws the progress bars as they go
    proc = subprocess.Popen([sys.executable, command_script(tmp_path), *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=terminal, env=env)
    os.close(terminal)
    shown = bytearray()

    def read(wait: float = 0) -> bytes:
        """What the command has drawn on its terminal so far (waiting up to ``wait`` s for more)."""
        while select.select([master], [], [], wait)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command has ended and everything was read
                break
            if not chunk:
                break
            shown.extend(chunk)
        return bytes(shown)
    try:
        if moment == "start-up":
            wait_for(lambda: _importing_torch(proc.pid), proc, "torch import")
        elif moment == "mid-pass":
            wait_for(lambda: b"fit next-paper" in read(), proc, "next-paper progress bar")
        else:
            wait_for(lambda: any(outdir.glob(".out.tmp-*")), proc, "temporary output folder")
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        read(wait=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", bytes(shown).decode(errors="replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert code == 128 + sig and lines and lines[-1] == "interrupted", (code, text)
    assert "Traceback" not in text and not any("interrupted" in line for line in lines[:-1])
    assert os.listdir(outdir) == [] and [tree_digest(trajectory), tree_digest(fitted)] == digests


# --- permissions and determinism -----------------------------------------------------------------------------

def test_outputs_get_the_umask_permissions(fitted, tmp_path):
    runs = []
    for mask in (0o022, 0o027):
        out = tmp_path / f"umask-{mask:03o}"
        runs += [[mask, ["fit", str(TRAJECTORY), "--out", str(out / "fit"), "--methods", "linear", "--json"]],
                 [mask, ["extend", "--fit", str(fitted), "--alpha", "1,2", "--method", "linear", "--format", "merged",
                         "--base", str(BASE), "--out", str(out / "merged")]]]
    for result in drive(runs):
        assert result["code"] == 0, result
    for mask in (0o022, 0o027):
        out = tmp_path / f"umask-{mask:03o}"
        modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
        assert {"fit/trajectory.safetensors", "merged/alpha-2.0/model.safetensors"} <= set(modes)
        for name, mode in modes.items():
            assert mode == (0o777 if (out / name).is_dir() else 0o666) & ~mask, (mask, name, oct(mode))


# Keys of the JSON outputs that may differ between two runs on the same inputs (README, "Reproducibility").
VOLATILE = {"manifest.json": [("created",), ("summary", "seconds")], "nextrap.json": [("fit",)]}


def _comparable(path: Path) -> bytes | dict:
    if path.suffix != ".json" or path.name not in VOLATILE:
        return path.read_bytes()
    doc = json.loads(path.read_text())
    for key in VOLATILE[path.name]:
        *parents, last = key
        node = doc
        for k in parents:
            node = node[k]
        node.pop(last)
    for entry in doc.get("inputs", []):  # when the fit saw each input, as "created"
        for f in entry["files"]:
            f.pop("seen_ns")
    return doc


def test_two_runs_write_the_same_bytes(trajectory, tmp_path):
    import nextrap

    for run in ("a", "b"):
        nextrap.fit(trajectory, tmp_path / run / "fit", epochs=FAST_EPOCHS, seed=3)
        nextrap.extend(tmp_path / run / "fit", [1.0, 1.5], tmp_path / run / "adapter", method="next-paper")
        nextrap.extend(tmp_path / run / "fit", [1.0], tmp_path / run / "merged", method="next", fmt="merged", base=BASE)
    a, b = ({p.relative_to(tmp_path / run): p for p in (tmp_path / run).rglob("*") if p.is_file()} for run in "ab")
    assert a.keys() == b.keys() and len(a) > 15
    for name in a:
        assert _comparable(a[name]) == _comparable(b[name]), name
