import argparse
import json

import pytest
import torch

from mimkit.engine.checkpoint import method_from_checkpoint
from mimkit.interop import export_checkpoint, import_mae_checkpoint

# facebookresearch/mae's MaskedAutoencoderViT parameter names, written out here independently of the exporter
BLOCK_PARAMS = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]
OFFICIAL_TOP = {
    "encoder.cls_token": "cls_token",
    "encoder.pos_embed": "pos_embed",
    "encoder.patch_embed.proj.weight": "patch_embed.proj.weight",
    "encoder.patch_embed.proj.bias": "patch_embed.proj.bias",
    "encoder.norm.weight": "norm.weight",
    "encoder.norm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.embed.weight": "decoder_embed.weight",
    "decoder.embed.bias": "decoder_embed.bias",
    "decoder.pos_embed": "decoder_pos_embed",
    "decoder.norm.weight": "decoder_norm.weight",
    "decoder.norm.bias": "decoder_norm.bias",
    "decoder.pred.weight": "decoder_pred.weight",
    "decoder.pred.bias": "decoder_pred.bias",
}


def official_table(depth, decoder_depth):
    table = dict(OFFICIAL_TOP)
    for i in range(depth):
        table.update({f"encoder.blocks.{i}.{p}": f"blocks.{i}.{p}" for p in BLOCK_PARAMS})
    for i in range(decoder_depth):
        table.update({f"decoder.blocks.{i}.{p}": f"decoder_blocks.{i}.{p}" for p in BLOCK_PARAMS})
    return table


def test_mae_export_round_trip_is_exact(write_ckpt, h, tmp_path):
    path, method, cfg = write_ckpt(img_size=(8, 12), channels=1, norm_pix=False)
    out = export_checkpoint(path, tmp_path / "mae", "mae")
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(official_table(12, 2).values())
    back = import_mae_checkpoint(out, tmp_path / "back.pt")  # shape, stats and settings come from config.json
    method2, cfg2, ckpt2 = method_from_checkpoint(back)
    h.assert_same_state(method.state_dict(), method2.state_dict())
    assert cfg2.model == cfg.model and cfg2.method == cfg.method
    assert ckpt2["data"] == {"img_size": [8, 12], "channels": 1, "mean": [0.5], "std": [0.25]}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_layout_file_imports_and_reproduces_the_loss(h, tmp_path, suffix):
    method, _, hw = h.make_method(img_size=16, channels=3, norm_pix=True, decoder="base", decoder_depth=1)
    table = official_table(12, 1)
    ours = method.state_dict()
    assert set(table) == set(ours)
    official = {table[k]: v.clone() for k, v in ours.items()}
    path = tmp_path / f"mae_pretrain{suffix}"
    if suffix == ".pth":  # as main_pretrain.py saves it, run arguments included
        torch.save({"model": official, "epoch": 399, "args": argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True)}, path)
    else:
        from safetensors.torch import save_file

        save_file(official, str(path))
    out = import_mae_checkpoint(path, tmp_path / "imported.pt", norm_pix=True)
    imported, cfg, ckpt = method_from_checkpoint(out)
    assert cfg.model.encoder == "vit_tiny" and cfg.model.patch_size == 4
    assert (cfg.model.decoder_depth, cfg.model.decoder_dim, cfg.model.decoder_heads) == (1, 512, 16)
    assert ckpt["data"]["img_size"] == [16, 16] and ckpt["data"]["mean"] == [0.485, 0.456, 0.406]
    assert ckpt["source"]["decoder"] == "loaded"
    x, z = h.images(3, hw), h.noise(16)
    with torch.no_grad():
        torch.testing.assert_close(imported({"image": x, "mask_noise": z})["loss"],
                                   method({"image": x, "mask_noise": z})["loss"], rtol=1e-6, atol=0)

    # what `mimkit visualize` draws comes out of the imported method
    rec = imported.reconstruct({"image": x, "mask_noise": z})
    assert rec.prediction.shape == x.shape and torch.isfinite(rec.pasted).all()

    # continued pretraining: the imported method trains (gradients reach encoder and decoder)
    imported.train()
    loss = imported({"image": x, "seed": torch.tensor([0, 1])})["loss"]
    loss.backward()
    assert imported.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert imported.decoder.pred.weight.grad is not None


def test_encoder_only_release_gets_a_fresh_decoder(h, tmp_path):
    method, _, hw = h.make_method(img_size=16, channels=3)
    table = official_table(12, 0)
    enc_only = {table[k]: v for k, v in method.state_dict().items() if k.startswith("encoder.")}
    enc_only["head.weight"] = torch.zeros(10, 192)  # a fine-tuned classifier head is dropped
    torch.save({"model": enc_only}, tmp_path / "mae_pretrain_vit_tiny.pth")
    out = import_mae_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", tmp_path / "imported.pt")
    imported, cfg, ckpt = method_from_checkpoint(out)
    assert ckpt["source"]["decoder"] == "initialised" and ckpt["source"]["dropped"] == ["head.weight"]
    assert cfg.model.decoder in ("mae", "base")
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(imported.encoder.state_dict()[k], v), k


def test_unknown_width_is_named(tmp_path):
    state = {"patch_embed.proj.weight": torch.zeros(200, 3, 4, 4), "pos_embed": torch.zeros(1, 17, 200),
             "cls_token": torch.zeros(1, 1, 200), "norm.weight": torch.zeros(200)}
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(Exception, match="width 200"):
        import_mae_checkpoint(tmp_path / "odd.pth", tmp_path / "x.pt")


def test_mae_config_json_describes_the_architecture(write_ckpt, tmp_path):
    path, method, cfg = write_ckpt()
    out = export_checkpoint(path, tmp_path / "mae", "mae")
    conf = json.loads((out / "config.json").read_text())
    con = conf["constructor"]
    # exactly the keyword arguments of MaskedAutoencoderViT.__init__ in facebookresearch/mae's models_mae.py
    # (written out here; norm_layer is built from layer_norm_eps), with the scalar types it expects
    assert sorted(con) == sorted(["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
                                  "norm_pix_loss"])
    assert (con["img_size"], con["patch_size"], con["in_chans"]) == (16, 4, 3)
    assert (con["embed_dim"], con["depth"], con["num_heads"]) == (192, 12, 3)
    assert (con["decoder_embed_dim"], con["decoder_depth"], con["decoder_num_heads"]) == (128, 2, 4)
    assert con["mlp_ratio"] == 4.0 and con["norm_pix_loss"] is True
    assert conf["layer_norm_eps"] == 1e-6 and "official_code_limits" not in conf
    assert method.encoder.norm.eps == 1e-6 and method.decoder.norm.eps == 1e-6


def test_mae_export_warns_about_what_the_official_code_cannot_run(write_ckpt, tmp_path, capsys):
    from mimkit.cli import main

    path, method, cfg = write_ckpt(img_size=(8, 12), channels=1)
    with pytest.warns(UserWarning) as caught:
        out = export_checkpoint(path, tmp_path / "mae", "mae")
    messages = [str(w.message) for w in caught]
    assert any("square" in m for m in messages) and any("hard-code 3 channels" in m for m in messages)
    conf = json.loads((out / "config.json").read_text())
    assert "constructor" not in conf and len(conf["official_code_limits"]) == 2
    assert main(["export", str(path), "--format", "mae", "--out", str(tmp_path / "m2")]) == 0
    assert capsys.readouterr().err.count("warning: facebookresearch/mae's code cannot run") == 2
    from mimkit.interop import ExportError

    with pytest.raises(ExportError) as err:
        export_checkpoint(path, tmp_path / "hf", "hf")
    assert "export the encoder to timm instead" in str(err.value) and "timm or mae" not in str(err.value)


def test_import_says_what_it_assumed_and_takes_the_settings(h, tmp_path, capsys):
    """An official-layout file with 8 decoder heads at width 128 (not visible in the weights)."""
    from mimkit.cli import main

    method, _, hw = h.make_method(img_size=16, channels=3, norm_pix=True, decoder_heads=8)
    table = official_table(12, 2)
    torch.save({"model": {table[k]: v for k, v in method.state_dict().items()}}, tmp_path / "official.pth")
    assert main(["import-mae", str(tmp_path / "official.pth"), "--out", str(tmp_path / "guess.pt")]) == 0
    out = capsys.readouterr().out
    assert "assumed: 4 decoder heads" in out and "--decoder-heads" in out and "assumed: norm_pix off" in out
    assert "assumed: ImageNet mean" in out and "assumed: image size 16x16" in out
    x, z = h.images(3, hw), h.noise(16)
    assert main(["import-mae", str(tmp_path / "official.pth"), "--out", str(tmp_path / "given.pt"),
                 "--decoder-heads", "8", "--norm-pix", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25",
                 "0.25", "--img-size", "16", "--mask-ratio", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "assumed" not in out
    given, cfg, ckpt = method_from_checkpoint(tmp_path / "given.pt")
    assert cfg.model.decoder_heads == 8 and cfg.method.norm_pix and ckpt["data"]["mean"] == [0.5] * 3
    with torch.no_grad():
        torch.testing.assert_close(given({"image": x, "mask_noise": z})["loss"],
                                   method({"image": x, "mask_noise": z})["loss"], rtol=1e-6, atol=0)


def test_run_trained_with_model_depth_imports(write_ckpt, h, tmp_path):
    path, method, cfg = write_ckpt(depth=3)
    out = export_checkpoint(path, tmp_path / "mae", "mae")
    back = import_mae_checkpoint(out, tmp_path / "back.pt")
    method2, cfg2, _ = method_from_checkpoint(back)
    assert cfg2.model.encoder == "vit_tiny" and cfg2.model.depth == 3
    h.assert_same_state(method.state_dict(), method2.state_dict())


def test_non_rgb_weights_need_their_statistics(h, tmp_path):
    method, _, _ = h.make_method(img_size=(8, 12), channels=1)
    table = official_table(12, 2)
    torch.save({"model": {table[k]: v for k, v in method.state_dict().items()}}, tmp_path / "gray.pth")
    with pytest.raises(Exception, match="give mean and std"):
        import_mae_checkpoint(tmp_path / "gray.pth", tmp_path / "x.pt", img_size=(8, 12))
    out = import_mae_checkpoint(tmp_path / "gray.pth", tmp_path / "x.pt", img_size=(8, 12), mean=[0.3], std=[0.2])
    h.assert_same_state(method.state_dict(), method_from_checkpoint(out)[0].state_dict())
