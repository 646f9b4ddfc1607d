"""Damaged files give one clear CheckpointError everywhere a checkpoint is read, and the checksum stored in every
checkpoint reports silent corruption of its tensors (issue 16 item 4)."""

from __future__ import annotations

import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import (CheckpointError, encoder_from_checkpoint, load_checkpoint,
                                      method_from_checkpoint, save_checkpoint_file)
from mimkit.interop import checkpoint_info, read_state_file
from mimkit.methods import build_method


def _good(path: Path) -> Path:
    cfg = load_config(None, ["model.depth=1", "data.img_size=16", "model.decoder=tiny", "data.channels=1",
                             "data.mean=[0.5]", "data.std=[0.25]"])
    torch.manual_seed(0)
    method = build_method(cfg, (16, 16), 1)
    save_checkpoint_file({"format": "mimkit-checkpoint", "version": 1, "config": cfg.model_dump(mode="json"),
                          "data": {"img_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.25]},
                          "model": method.state_dict()}, path)
    return path


def _tensor_regions(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of the tensor records inside a torch zip file."""
    raw = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            out.append((start, start + info.compress_size))
    return out


def _readers():
    return {"load_checkpoint": load_checkpoint, "method_from_checkpoint": method_from_checkpoint,
            "encoder_from_checkpoint": encoder_from_checkpoint, "checkpoint_info": checkpoint_info,
            "read_state_file (import-mae)": read_state_file}


def test_garbage_files_give_one_clear_error_in_every_reader(tmp_path):
    good = _good(tmp_path / "good.ckpt")
    data = good.read_bytes()
    rnd = random.Random(16)
    files = {"text.ckpt": b"this is not a checkpoint\nat all\n", "empty.ckpt": b"",
             "pickle_noise.ckpt": b"\x80\x02" + bytes(rnd.randrange(256) for _ in range(300))}
    for i in range(20):
        files[f"random{i}.ckpt"] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 4000)))
    for i in range(20):
        files[f"truncated{i}.ckpt"] = data[:rnd.randint(1, len(data) - 1)]
    for i in range(20):  # bytes flipped anywhere: the unpickler or the checksum must notice, never another error
        b = bytearray(data)
        for pos in rnd.sample(range(len(b)), 20):
            b[pos] ^= 0xFF
        files[f"flipped{i}.ckpt"] = bytes(b)
    escaped = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for reader_name, reader in _readers().items():
            try:
                reader(path)
            except CheckpointError as err:
                assert name in str(err)
            except Exception as err:  # noqa: BLE001 - what the test is about
                escaped.append(f"{name} in {reader_name}: {type(err).__name__}: {err}")
            else:
                assert name.startswith("flipped") and reader_name == "read_state_file (import-mae)", (name, reader_name)
    assert escaped == []


def test_flipped_tensor_bytes_are_reported_by_the_checksum(tmp_path):
    good = _good(tmp_path / "good.ckpt")
    data, regions = good.read_bytes(), _tensor_regions(good)
    assert regions and load_checkpoint(good)["checksum"].startswith("crc32:")
    rnd = random.Random(4)
    for i in range(30):
        b = bytearray(data)
        for _ in range(20):
            start, end = rnd.choice(regions)
            pos = rnd.randrange(start, end)
            b[pos] ^= 1 << rnd.randrange(8)
        path = tmp_path / f"flip{i}.ckpt"
        path.write_bytes(bytes(b))
        with pytest.raises(CheckpointError, match=rf"flip{i}.ckpt is damaged: .*checksum"):
            load_checkpoint(path)


def test_old_checkpoints_without_a_checksum_still_load(tmp_path):
    good = _good(tmp_path / "good.ckpt")
    ckpt = torch.load(good, weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    method, cfg, loaded = method_from_checkpoint(tmp_path / "old.ckpt")
    assert "checksum" not in loaded and cfg.model.depth == 1


def test_cli_says_what_a_file_is(tmp_path, capsys):
    from PIL import Image

    from mimkit.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "some.png")
    assert main(["info", str(tmp_path / "some.png")]) == 2
    err = capsys.readouterr().err
    assert "some.png is not a checkpoint: it is a PNG image" in err and "execute code" not in err
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for argv in (["info", str(text)], ["eval", str(text)], ["import-mae", str(text), "--out", str(tmp_path / "o.ckpt")],
                 ["pretrain", "--resume", str(text), "trainer.progress=false"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "notes.txt" in err[0], (argv, err)
