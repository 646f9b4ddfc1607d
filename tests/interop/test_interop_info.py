import torch

from mimkit.interop import checkpoint_info, format_info


def test_info_reports_architecture_counts_and_progress(write_ckpt):
    # the layout the trainer writes (engine/checkpoint.py)
    extra = {"progress": {"global_step": 120, "epoch": 3, "position": 64, "total_steps": 1000},
             "metrics": {"loss": torch.tensor(0.4321), "lr": 1e-4},
             "optimizer": {"state": {}, "param_groups": []}}
    path, method, cfg = write_ckpt(img_size=(8, 12), channels=1, extra=extra)
    info = checkpoint_info(path)
    enc = sum(t.numel() for t in method.encoder.state_dict().values())
    dec = sum(t.numel() for t in method.decoder.state_dict().values())
    assert info["method"] == "mae" and info["encoder"] == "vit_tiny"
    assert info["params"]["encoder"] == enc and info["params"]["decoder"] == dec
    assert info["params"]["total"] == enc + dec
    assert info["img_size"] == [8, 12] and info["channels"] == 1 and info["patch_size"] == [4, 4]
    assert info["mean"] == [0.5] and info["std"] == [0.25]
    assert info["step"] == 120 and info["epoch"] == 3 and info["total_steps"] == 1000
    assert abs(info["metrics"]["loss"] - 0.4321) < 1e-6
    assert info["file_size"] == path.stat().st_size
    text = format_info(info)
    for needle in ("vit_tiny", "8x12, 1 channel", "step 120/1000, epoch 3", "loss=0.4321", "patch size", "4x4", "MiB"):
        assert needle in text, needle


def test_info_without_training_state(write_ckpt):
    path, _, _ = write_ckpt()
    info = checkpoint_info(path)
    assert info["step"] is None and info["epoch"] is None and info["metrics"] is None
    assert "none recorded" in format_info(info)


def test_info_reads_older_progress_spellings(write_ckpt):
    path, _, _ = write_ckpt(extra={"progress": {"step": 7, "epoch": 0.5, "metrics": {"loss": 1.5}}})
    info = checkpoint_info(path)
    assert (info["step"], info["epoch"], info["metrics"]) == (7, 0.5, {"loss": 1.5})
