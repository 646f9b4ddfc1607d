import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimkit.engine.checkpoint import method_from_checkpoint
from mimkit.interop import ExportError, export_checkpoint, import_hf


def _load_hf(folder):
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_loss_equals_mimkit_loss_for_the_same_noise(write_ckpt, h, tmp_path, norm_pix):
    path, method, cfg = write_ckpt(norm_pix=norm_pix)
    out = export_checkpoint(path, tmp_path / "hf", "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["layer_norm_eps"] == 1e-6 and conf["norm_pix_loss"] is norm_pix
    assert (conf["hidden_size"], conf["num_hidden_layers"], conf["num_attention_heads"]) == (192, 12, 3)
    assert (conf["decoder_hidden_size"], conf["decoder_num_hidden_layers"], conf["decoder_num_attention_heads"]) == (128, 2, 4)
    model = _load_hf(out)
    x, z = h.images(3, (16, 16)), h.noise(16)
    with torch.no_grad():
        theirs = model(pixel_values=x, noise=z)
        ours = method({"image": x, "mask_noise": z})
    torch.testing.assert_close(theirs.loss, ours["loss"], rtol=1e-5, atol=0)
    assert theirs.mask.bool().equal(method.make_mask({"mask_noise": z}).masked)


def test_hf_export_refuses_non_square_images(write_ckpt, tmp_path):
    path, _, _ = write_ckpt(img_size=(8, 12), channels=1)
    with pytest.raises(ExportError, match="square image size"):
        export_checkpoint(path, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_hf_round_trip_keeps_every_weight(write_ckpt, h, tmp_path):
    path, method, cfg = write_ckpt(channels=1, norm_pix=False, decoder="small")
    out = export_checkpoint(path, tmp_path / "hf", "hf")
    back = import_hf(out, tmp_path / "back.pt")
    method2, cfg2, ckpt2 = method_from_checkpoint(back)
    h.assert_same_state(method.state_dict(), method2.state_dict())
    assert cfg2.model == cfg.model
    assert cfg2.method == cfg.method
    assert ckpt2["data"]["mean"] == [0.5] and ckpt2["data"]["std"] == [0.25]

    # what transformers itself writes (save_pretrained) imports to the same weights too
    _load_hf(out).save_pretrained(tmp_path / "resaved")
    back2 = import_hf(tmp_path / "resaved", tmp_path / "back2.pt", mean=[0.5], std=[0.25])
    h.assert_same_state(method.state_dict(), method_from_checkpoint(back2)[0].state_dict())
