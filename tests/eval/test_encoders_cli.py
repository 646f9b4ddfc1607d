"""load_encoder gives the same tokens for a mimkit checkpoint and its timm / Hugging Face exports; the CLI runs
every protocol on Fashion-MNIST and writes its JSON."""

import json

import pytest
import torch

from mimkit.config import PretrainConfig
from mimkit.engine.checkpoint import CheckpointError
from mimkit.eval import load_encoder
from mimkit.interop import export_checkpoint, save_method_checkpoint
from mimkit.methods import build_method


def _run_dir(tmp_path, img_size, channels):
    torch.manual_seed(0)
    cfg = PretrainConfig(model={"encoder": "vit_tiny", "patch_size": 4},
                         data={"img_size": img_size, "channels": channels})
    method = build_method(cfg, (img_size, img_size), channels)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = {"img_size": [img_size] * 2, "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels}
    run = tmp_path / "run"
    save_method_checkpoint(method.eval(), cfg, meta, run / "checkpoints" / "last.ckpt")
    return run, method


def test_mimkit_timm_and_hf_encoders_agree(tmp_path):
    run, method = _run_dir(tmp_path, 16, 3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    enc, size, channels, mean, std = load_encoder(run)
    assert (size, channels, mean, std) == ((16, 16), 3, [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        ref = method.encoder(x)
        ref_layer = enc.forward_layers(x, [1, -1])
        torch.testing.assert_close(enc(x), ref)
        assert ref.shape == (2, 1 + 16, 192) and enc.depth == 12 and enc.embed_dim == 192
        for fmt, spec in (("timm", "timm:local-dir:{}"), ("hf", "hf:{}")):
            out = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / fmt, fmt)
            other = load_encoder(spec.format(out))
            assert other.img_size == (16, 16) and other.channels == 3 and other.encoder.depth == 12
            torch.testing.assert_close(other.encoder(x), ref, atol=1e-4, rtol=1e-4)
            for a, b in zip(other.encoder.forward_layers(x, [1, -1]), ref_layer):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            grey = x[:, :1]  # repeated to RGB by the adapter
            torch.testing.assert_close(other.encoder(grey), other.encoder(grey.expand(-1, 3, -1, -1)))


def test_unavailable_encoders_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="timm"):
        load_encoder("timm:no_such_model_xyz")
    try:  # a real name: its weights are taken from the local cache only, never downloaded
        assert load_encoder("timm:vit_tiny_patch16_224").encoder.depth == 12
    except CheckpointError as err:
        assert "locally" in str(err)
    with pytest.raises(CheckpointError, match="config.json"):
        load_encoder(f"hf:{tmp_path}")
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "missing")


def test_cli_protocols_on_fashion_mnist(tmp_path, fashion_mnist_dir, capsys):
    from mimkit.cli import main

    run, _ = _run_dir(tmp_path, 28, 1)
    small = ["eval.train_limit=400", "eval.test_limit=150", "eval.linear_epochs=3", "eval.layers_epochs=2",
             "eval.fewshot_seeds=2", "eval.attentive_epochs=1", "eval.batch_size=200"]
    for protocol, words in (("linear", "linear probe"), ("fewshot", "5-shot"), ("attentive", "efficient_probe"),
                            ("knn", "kNN top-1")):
        assert main(["eval", str(run), "--protocol", protocol, *small]) == 0
        assert words in capsys.readouterr().out
        res = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert {"protocol", "metric", "value", "details", "seconds"} <= set(res) and res["protocol"] == protocol
        assert 0.1 < res["value"] <= 1.0  # chance is 0.10
    assert json.loads((run / "eval" / "knn.json").read_text())["queries"] == 150
    assert main(["eval", str(run), "--protocol", "layers", "--layers", "0,5,11", "--json", str(tmp_path / "l.json"),
                 *small]) == 0
    assert [r["layer"] for r in json.loads((tmp_path / "l.json").read_text())["details"]["layers"]] == [0, 5, 11]
    export = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "timm", "timm")
    assert main(["eval", f"timm:local-dir:{export}", "--protocol", "finetune", "--compare-scratch",
                 "eval.finetune_max_steps=2", "eval.finetune_batch_size=16", *small]) == 0
    out = capsys.readouterr().out
    assert "pretrained" in out and "scratch" in out
