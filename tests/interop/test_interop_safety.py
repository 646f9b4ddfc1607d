"""Weights are never read by unpickling arbitrary objects: a file that would run code is refused."""

import os

import pytest
import torch

from mimkit.engine.checkpoint import CheckpointError, load_checkpoint
from mimkit.interop import checkpoint_info, import_hf, import_mae_checkpoint, read_state_file


class Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"cls_token": torch.zeros(1, 1, 192), "payload": Payload(marker)}
    torch.save({"model": state}, path)
    assert not marker.exists()
    return path, marker


def test_malicious_pickle_is_refused_everywhere(malicious, tmp_path):
    path, marker = malicious
    for call in (lambda: import_mae_checkpoint(path, tmp_path / "out.pt"), lambda: read_state_file(path),
                 lambda: load_checkpoint(path), lambda: checkpoint_info(path)):
        with pytest.raises(CheckpointError, match="refusing to load .*could execute code"):
            call()
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_malicious_pytorch_model_bin_in_an_hf_folder_is_refused(malicious, tmp_path):
    path, marker = malicious
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit_mae", "hidden_size": 192, "num_hidden_layers": 12, '
                                        '"num_attention_heads": 3, "intermediate_size": 768}')
    os.replace(path, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        import_hf(folder, tmp_path / "out.pt")
    assert not marker.exists()
