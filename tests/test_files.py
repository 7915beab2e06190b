import pytest

from nextrap.errors import NextrapError
from nextrap.files import atomic_dir


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


def test_existing_output_is_refused_unless_overwrite_and_kept_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(NextrapError, match="already exists"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True, markers=("old.txt",)):
            raise RuntimeError
    assert (target / "old.txt").read_text() == "old"
    with atomic_dir(target, overwrite=True, markers=("old.txt",)) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_a_folder_nextrap_did_not_make(tmp_path):
    from nextrap.files import check_replaceable

    mine = tmp_path / "mine"
    (mine / "alpha-1.0").mkdir(parents=True)
    (mine / "alpha-1.0" / "nextrap.json").write_text("{}")
    check_replaceable(mine, True, ("nextrap.json", "alpha-*/nextrap.json"))
    check_replaceable(tmp_path / "missing", False, ())
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", True, ("nextrap.json",))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(NextrapError, match="not an output of nextrap"):
        with atomic_dir(home, overwrite=True, markers=("nextrap.json",)):
            pass
    assert (home / "thesis.tex").read_text() == "precious"
