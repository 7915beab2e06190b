import pytest
import torch

from conftest import BASE
from nextrap.core.errors import NextrapError
from nextrap.writers.merged import write_merged


def test_a_modules_to_save_tensor_of_another_shape_is_refused_naming_both_files(tmp_path):
    # an embedding saved by modules_to_save after the vocabulary was resized (51 tokens in the base, 53 trained)
    adapter = tmp_path / "ckpts" / "step_60" / "adapter_model.safetensors"
    replaced = {"model.embed_tokens.weight": torch.zeros(53, 64)}
    with pytest.raises(NextrapError) as err:
        write_merged(tmp_path / "out", BASE, [], 1 << 30, replaced, adapter)
    assert str(err.value) == (f"{adapter}: tensor model.embed_tokens.weight (modules_to_save) has shape [53, 64], but "
                              f"{BASE / 'model.safetensors'} has [51, 64] (a resized vocabulary? the base must have "
                              "the adapter's shapes)")
    assert not (tmp_path / "out").exists()  # refused before anything is written
