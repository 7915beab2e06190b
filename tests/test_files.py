import json

import pytest

from nextrap.core.errors import NextrapError
from nextrap.io.files import OUTPUT_MARKER, atomic_dir, check_apart, check_replaceable, write_marker


def test_output_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert json.loads((target / OUTPUT_MARKER).read_text())["files"] == ["a.txt"]


def test_existing_output_is_refused_unless_overwrite_and_kept_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_text("x")
    with pytest.raises(NextrapError, match="already exists"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True):
            raise RuntimeError
    assert (target / "old.txt").read_text() == "old"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("planted", ["notes.txt", "sub/deep.txt", "sub"])
def test_overwrite_refuses_a_user_folder_that_merely_has_our_file_names(tmp_path, planted):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"format": "nextrap-fit/1"}))
    (mine / "nextrap.json").write_text("{}")
    (mine / planted).parent.mkdir(parents=True, exist_ok=True)
    if planted == "sub":
        (mine / "sub").mkdir(exist_ok=True)
    else:
        (mine / planted).write_text("precious")
    before = sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*"))
    with pytest.raises(NextrapError, match="not an output of nextrap"):
        with atomic_dir(mine, overwrite=True):
            pass
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == before


def test_overwrite_refuses_our_output_once_a_user_added_a_file(tmp_path):
    out = tmp_path / "jumped"
    with atomic_dir(out) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"x")
    check_replaceable(out, True)
    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(NextrapError, match="my-notes.md was not written by nextrap"):
        check_replaceable(out, True)
    (out / "my-notes.md").unlink()
    (out / OUTPUT_MARKER).write_text("{not json")
    with pytest.raises(NextrapError, match="not a valid nextrap output marker"):
        check_replaceable(out, True)


def test_a_legacy_fit_folder_is_replaceable_only_when_it_holds_nothing_else(tmp_path):
    legacy = tmp_path / "fit"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"format": "nextrap-fit/1"}))
    (legacy / "trajectory.safetensors").write_bytes(b"x")
    check_replaceable(legacy, True)
    (legacy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NextrapError, match="not a nextrap fit manifest"):
        check_replaceable(legacy, True)


def test_a_workspace_owns_the_names_it_declares(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    write_marker(ws, "pipeline", trees=("plain", "jump-*"))
    (ws / "plain" / "step_10").mkdir(parents=True)
    (ws / "jump-next").mkdir()
    (ws / "jump-next" / "adapter_model.safetensors").write_bytes(b"x")
    check_replaceable(ws, True)
    (ws / "thesis.tex").write_text("precious")
    with pytest.raises(NextrapError, match="thesis.tex was not written by nextrap"):
        check_replaceable(ws, True)


def test_empty_or_missing_targets_are_fine_and_a_file_is_refused(tmp_path):
    check_replaceable(tmp_path / "missing", False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NextrapError, match="not a folder"):
        check_replaceable(tmp_path / "afile", True)


def test_outputs_never_go_inside_an_input_or_around_one(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    with pytest.raises(NextrapError, match="inside the checkpoint folder"):
        check_apart(ckpts / "jumped", {"the checkpoint folder": ckpts})
    with pytest.raises(NextrapError, match="inside the checkpoint folder"):
        check_apart(ckpts, {"the checkpoint folder": ckpts})
    with pytest.raises(NextrapError, match="holds the checkpoint folder"):
        check_apart(tmp_path, {"the checkpoint folder": ckpts})
    check_apart(tmp_path / "jumped", {"the checkpoint folder": ckpts, "the base model": None})


def test_safetensors_headers_are_published_with_their_metadata_sorted(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = {k: str(i) for i, k in enumerate("qwertyuiopasdfgh")}
    with atomic_dir(tmp_path / "out") as tmp:
        save_file({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, str(tmp / "x.safetensors"), metadata=meta)
        (tmp / "junk.safetensors").write_bytes(b"\x01")  # not safetensors: left as it is
    path = tmp_path / "out" / "x.safetensors"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert list(json.loads(path.read_bytes()[8:8 + n])["__metadata__"]) == sorted(meta)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("a"), torch.ones(2, 2))
    assert (tmp_path / "out" / "junk.safetensors").read_bytes() == b"\x01"


def test_a_full_disk_is_named_and_the_temporary_folder_removed(tmp_path):
    import errno
    import re

    from safetensors import SafetensorError

    out = tmp_path / "out"
    for error, named in ((SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), out),
                         (OSError(errno.ENOSPC, "No space left on device", "model.safetensors"), out / "model.safetensors")):
        with pytest.raises(NextrapError, match=f"^no space left on device writing {re.escape(str(named))}$"):
            with atomic_dir(out) as tmp:
                if isinstance(error, OSError):  # the file being written, in the temporary folder
                    error.filename = str(tmp / error.filename)
                raise error
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite, refusal", [(False, "already exists"), (True, "not an output of nextrap")])
def test_a_folder_that_appears_at_the_target_while_writing_is_refused_not_deleted(tmp_path, overwrite, refusal):
    target = tmp_path / "out"
    with pytest.raises(NextrapError, match=f"{target}: {refusal}"):
        with atomic_dir(target, overwrite=overwrite) as tmp:
            (tmp / "a.txt").write_text("a")
            target.mkdir()  # made by someone else during a long run
            (target / "notes.txt").write_text("precious")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temporary folder is gone
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_a_failed_run_removes_the_empty_parent_folders_it_created(tmp_path):
    target = tmp_path / "runs" / "exp1" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            (target.parent / "keep.txt").write_text("x")  # written beside us meanwhile: exp1/ and so runs/ stay
            raise RuntimeError("boom")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["runs", "runs/exp1", "runs/exp1/keep.txt"]
    (target.parent / "keep.txt").unlink()
    with pytest.raises(RuntimeError):
        with atomic_dir(target):  # runs/exp1 was there before: never removed
            raise RuntimeError("boom")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["runs", "runs/exp1"]
