import json

import pytest
import torch

from conftest import TRAJECTORY
from nextrap.core.errors import NextrapError
from nextrap.engine.lorafeatures import compute_features
from nextrap.io.checkpoints import load_trajectory
from nextrap.methods import next_paper
from nextrap.methods.predictor import Group, NExtMLP, Predictor, TrainSettings, legacy_key, make_groups, predict, train


@pytest.fixture(scope="module")
def feats():
    return compute_features(load_trajectory(TRAJECTORY), 5, sign_align=False)


def test_a_saved_predictor_loads_and_predicts_the_same(feats, tmp_path):
    pred = train(feats, TrainSettings(epochs=3))
    saved = next_paper.save(pred, tmp_path)
    assert set(saved["loss"]) == {g.key for g in pred.groups}
    again = next_paper.load(tmp_path, TrainSettings())
    row = feats.n_rows - 1
    a, b = predict(pred, feats, row), predict(again, feats, row)
    assert all(torch.equal(a[m][p], b[m][p]) for m in a for p in a[m])


def test_a_predictor_saved_before_the_groups_had_keys_still_loads(feats, tmp_path):
    """Fits saved before u's and v's had models of their own grouped them by length alone, under ``len{d}.``
    weights and with no ``key`` in predictor.json: they load and predict with the models they were trained as."""
    by_length: dict[int, Group] = {}
    for g in make_groups(feats):
        by_length.setdefault(g.length, Group(legacy_key(g.length), g.length, [])).members.extend(g.members)
    torch.manual_seed(0)
    old = Predictor(list(by_length.values()), {legacy_key(d): NExtMLP(d) for d in by_length}, TrainSettings(epochs=1))
    for g in old.groups:
        g.losses = [1.0]
    next_paper.save(old, tmp_path)
    config = json.loads((tmp_path / next_paper.CONFIG).read_text())
    for g in config["groups"]:
        del g["key"]
    (tmp_path / next_paper.CONFIG).write_text(json.dumps(config))
    loaded = next_paper.load(tmp_path, TrainSettings())
    assert [g.key for g in loaded.groups] == [f"len{d}" for d in by_length]
    row = feats.n_rows - 1
    a, b = predict(old, feats, row), predict(loaded, feats, row)
    assert all(torch.equal(a[m][p], b[m][p]) for m in a for p in a[m])


def test_weights_that_do_not_fit_the_config_are_a_one_line_error(feats, tmp_path):
    next_paper.save(train(feats, TrainSettings(epochs=1)), tmp_path)
    config = json.loads((tmp_path / next_paper.CONFIG).read_text())
    config["groups"][1]["key"] = "u9999"
    (tmp_path / next_paper.CONFIG).write_text(json.dumps(config))
    with pytest.raises(NextrapError, match="predictor.safetensors: cannot load the predictor"):
        next_paper.load(tmp_path, TrainSettings())
