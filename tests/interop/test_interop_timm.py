import json

import pytest
import timm
import torch

from mimkit.interop import export_checkpoint, import_timm
from mimkit.engine.checkpoint import method_from_checkpoint


@pytest.mark.parametrize("img_size,channels", [(16, 3), ((8, 12), 1)])
def test_timm_folder_gives_the_same_features(write_ckpt, h, tmp_path, img_size, channels):
    path, method, _ = write_ckpt(img_size=img_size, channels=channels)
    out = export_checkpoint(path, tmp_path / "timm", "timm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == method.encoder.timm_name
    assert conf["model_args"] == json.loads(json.dumps(method.encoder.timm_kwargs()))

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    hw = method.grid.img_size
    assert tuple(model.pretrained_cfg["input_size"]) == (channels, *hw)
    assert list(model.pretrained_cfg["mean"]) == [0.5] * channels
    assert list(model.pretrained_cfg["std"]) == [0.25] * channels
    assert model.num_classes == 0
    x = h.images(channels, hw)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), method.encoder(x), atol=1e-5, rtol=0)


def test_timm_folder_imports_back_with_the_same_encoder(write_ckpt, tmp_path):
    path, method, _ = write_ckpt(img_size=(8, 12), channels=1)
    out = export_checkpoint(path, tmp_path / "timm", "timm")
    ckpt = import_timm(out, tmp_path / "back.pt")
    back, cfg, raw = method_from_checkpoint(ckpt)
    assert raw["source"]["decoder"] == "initialised"
    assert cfg.model.encoder == "vit_tiny" and cfg.model.patch_size == 4
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v), k


def _a2mim_resnet_checkpoint(tmp_path, img_size):
    from mimkit.config import PretrainConfig
    from mimkit.interop import save_method_checkpoint
    from mimkit.methods import build_method

    cfg = PretrainConfig(method={"name": "a2mim"}, model={"encoder": "resnet18", "patch_size": 16},
                         data={"img_size": img_size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3})
    torch.manual_seed(0)
    method = build_method(cfg, (img_size, img_size), 3).eval()
    meta = {"img_size": [img_size, img_size], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    return save_method_checkpoint(method, cfg, meta, tmp_path / f"r{img_size}.ckpt"), method


def test_a_cnn_exports_to_timm_with_its_own_pooling_and_names(tmp_path):
    path, method = _a2mim_resnet_checkpoint(tmp_path, 64)
    out = export_checkpoint(path, tmp_path / "timm", "timm")
    conf = json.loads((out / "config.json").read_text())
    assert conf["global_pool"] == "avg" and conf["pretrained_cfg"]["first_conv"] == "conv1"
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.encoder(x)[:, 0], atol=1e-5, rtol=0)  # pooled feature


def test_a_cnn_timm_cannot_express_is_refused_by_name(tmp_path):
    from mimkit.interop.export import ExportError

    path, _ = _a2mim_resnet_checkpoint(tmp_path, 32)  # small-image stem: conv1 stride 1, no maxpool
    with pytest.raises(ExportError, match="small-image stem"):
        export_checkpoint(path, tmp_path / "timm", "timm")
