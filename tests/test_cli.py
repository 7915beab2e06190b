import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tree_digest
from nextrap.cli import app
from nextrap.methods import METHODS

runner = CliRunner()


def test_help_lists_the_contract_options():
    for cmd, opts in {"fit": ["--out", "--horizon", "--seed", "--epochs", "--device", "--json", "--no-sign-align"],
                      "extend": ["--fit", "--alpha", "--out", "--format", "--base", "--method", "--json"]}.items():
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0
        for opt in opts:
            assert opt in res.output, (cmd, opt)


def test_fit_then_extend_json(trajectory, tmp_path):
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--epochs", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["steps"][-1] == 160 and out["horizon"] == 5 and len(out["backtest"]) == len(METHODS) + 1
    res = runner.invoke(app, ["extend", "--fit", str(tmp_path / "fit"), "--alpha", "1.0,2.0", "--out", str(tmp_path / "j"),
                                "--method", "next", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["alphas"] == [1.0, 2.0] and out["method"] == "next"
    assert (tmp_path / "j" / "alpha-2.0" / "adapter_config.json").is_file()


def test_human_summary(trajectory, tmp_path):
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--epochs", "2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("checkpoints", "rank-1 energy", "predictor loss", "backtest", "oracle-rank1", "linear"):
        assert text in res.output


def test_corrupt_checkpoint_is_one_line_exit_1_and_nothing_written(trajectory, tmp_path):
    weights = trajectory / "step_70" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 20)
    before = tree_digest(trajectory)
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--epochs", "2"])
    assert res.exit_code == 1
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "step_70/adapter_model.safetensors" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "fit").exists()
    assert tree_digest(trajectory) == before


def test_existing_output_and_bad_alpha_exit_1(trajectory, tmp_path):
    (tmp_path / "fit").mkdir()
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit")])
    assert res.exit_code == 1 and "already exists" in res.stderr
    res = runner.invoke(app, ["extend", "--fit", str(tmp_path / "fit"), "--alpha", "big", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--alpha" in res.stderr


def test_extend_auto_and_loud_warning(fitted, tmp_path):
    res = runner.invoke(app, ["extend", "--fit", str(fitted), "--alpha", "auto", "--method", "auto", "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["choice"]["method"] in ("next", "linear", "expo", "relex") and out["alphas"] == [out["choice"]["alpha"]]
    info = json.loads((tmp_path / "a" / "nextrap.json").read_text())
    assert info["choice"] == out["choice"]
    res = runner.invoke(app, ["extend", "--fit", str(fitted), "--alpha", "4", "--method", "expo", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "warning:" in res.stderr and "worse than not jumping" in res.stderr


def test_overwrite_never_deletes_a_users_folder_that_has_a_manifest(trajectory, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "manifest.json").write_text("{}")
    (mine / "notes.txt").write_text("precious")
    before = tree_digest(mine)
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(mine), "--overwrite", "--epochs", "2", "--json"])
    assert res.exit_code == 1
    assert "not an output of nextrap" in res.output and "refusing to replace it" in res.output
    assert tree_digest(mine) == before and (mine / "sub").is_dir()


def test_outputs_inside_the_checkpoint_folder_are_refused_and_the_run_stays_fittable(trajectory, tmp_path):
    before = tree_digest(trajectory)
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(trajectory / "fit"), "--epochs", "2", "--json"])
    assert res.exit_code == 1 and "inside the checkpoint folder" in res.output
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--methods", "linear", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["extend", "--fit", str(tmp_path / "fit"), "--method", "linear", "--alpha", "1",
                              "--out", str(trajectory / "jumped"), "--json"])
    assert res.exit_code == 1 and "inside the checkpoint folder" in res.output
    assert tree_digest(trajectory) == before
    res = runner.invoke(app, ["extend", "--fit", str(tmp_path / "fit"), "--method", "linear", "--alpha", "1",
                              "--out", str(tmp_path / "jumped"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["fit", str(trajectory), "--out", str(tmp_path / "fit"), "--methods", "linear", "--overwrite", "--json"])
    assert res.exit_code == 0, res.output  # replacing our own fit is allowed


def test_help_and_usage_errors_never_load_torch():
    """`nextrap --help` and a bad option answer in a fraction of a second: neither torch nor transformers loads."""
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom nextrap.cli import app\n"
            "codes = [CliRunner().invoke(app, a).exit_code for a in (['--help'], ['fit', '--help'], ['grpo', '--help'],"
            " ['pipeline', '--help'], ['extend', '--help'], ['fit'], ['extend', '--nope'])]\n"
            "print(codes, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[0, 0, 0, 0, 0, 2, 2] False False"


def test_the_library_functions_stay_functions_when_their_modules_load():
    """In a fresh interpreter (where nothing has loaded them yet): loading the modules that hold fit and extend,
    as the library itself does, leaves nextrap.fit and nextrap.extend the functions."""
    import subprocess
    import sys

    code = ("import nextrap\nimport nextrap.api.extend\nfrom nextrap.api.fit import load_fit\n"
            "print(callable(nextrap.fit), callable(nextrap.extend), nextrap.fit.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True True nextrap.api.fit"


def test_json_that_stdout_cannot_take_is_one_line_and_exit_1(fitted, tmp_path):
    """`--json > /dev/full`: the failed write is an error line on stderr, not a traceback at exit."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    cli = Path(sys.executable).parent / "nextrap"
    with open("/dev/full", "w") as full:
        done = subprocess.run([str(cli), "extend", "--fit", str(fitted), "--alpha", "1", "--method", "linear",
                               "--out", str(tmp_path / "j"), "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "cannot write the JSON to stdout: no space left on device" in lines[0]
