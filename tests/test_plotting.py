import pytest

from nextrap.api.plotting import plot_path
from nextrap.core.errors import NextrapError


def test_plot_path_adds_png_refuses_folders_and_existing_files(tmp_path):
    assert plot_path(tmp_path / "energyplot") == tmp_path / "energyplot.png"
    assert plot_path(tmp_path / "energy.svg") == tmp_path / "energy.svg"
    (tmp_path / "taken.png").mkdir()
    for folder in (tmp_path, tmp_path / "taken"):
        with pytest.raises(NextrapError, match="is a folder; give a file name"):
            plot_path(folder)
    (tmp_path / "old.png").write_bytes(b"precious")
    with pytest.raises(NextrapError, match="old.png: already exists; pass --overwrite"):
        plot_path(tmp_path / "old.png")
    assert plot_path(tmp_path / "old.png", overwrite=True) == tmp_path / "old.png"
    with pytest.raises(NextrapError, match="folder .*nope does not exist"):
        plot_path(tmp_path / "nope" / "a.png")
