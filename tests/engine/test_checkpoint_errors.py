"""Weights from another architecture are refused with a message that names the file and the keys that differ.

`load_state_strict` guards every path that puts checkpoint weights into a method: `method_from_checkpoint`
(eval, visualize, report, export), resuming a run and `--init`. (Checkpoints whose pickle would run code
are refused before this point: tests/interop/test_interop_safety.py; here only the run-folder path.)
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import (
    FORMAT, VERSION, CheckpointError, atomic_torch_save, find_checkpoint, load_state_strict, method_from_checkpoint,
)
from mimkit.methods import build_method

SIZE = (16, 16)


def _cfg(*overrides):
    return load_config(None, ["model.patch_size=4", "model.decoder=tiny", "model.depth=1", "data.img_size=16",
                              *overrides])


def _method(*overrides, channels=1):
    torch.manual_seed(0)
    return build_method(_cfg(*overrides), SIZE, channels)


def _listed(msg: str, kind: str) -> int:
    """How many keys of `kind` the message reports: "kind (N): ..." or the names shown plus "(+N more)"."""
    m = re.search(rf"{kind}(?: \((\d+)\))?: (.*?)(?:; (?:missing keys|unexpected keys|shape mismatches)|$)", msg)
    assert m, f"no {kind!r} in {msg!r}"
    text = m.group(2)
    more = re.search(r"\(\+(\d+) more\)", text)
    names = re.sub(r"\s*\.\.\. \(\+\d+ more\)", "", text)
    shown = len([s for s in re.split(r", (?=[A-Za-z_])", names) if s])  # not inside shapes "(1, 1, 384)"
    assert 1 <= shown <= 12, text  # a few names, not hundreds
    total = shown + (int(more.group(1)) if more else 0)
    if m.group(1) is not None:
        assert int(m.group(1)) == total, msg
    return total


def _save_ckpt(path, cfg, method, channels=1):
    atomic_torch_save({"format": FORMAT, "version": VERSION, "config": cfg.model_dump(mode="json"),
                       "data": {"img_size": list(SIZE), "channels": channels, "mean": [0.5] * channels,
                                "std": [0.25] * channels},
                       "model": method.state_dict()}, path)


def test_vit_small_weights_into_vit_tiny_list_the_shape_mismatches(tmp_path):
    small, tiny = _method("model.encoder=vit_small"), _method("model.encoder=vit_tiny")
    state = small.state_dict()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_state_strict(tiny, state, str(tmp_path / "small.ckpt"))
    msg = str(err.value)
    assert str(tmp_path / "small.ckpt") in msg and "do not fit this architecture" in msg
    assert "missing keys" not in msg and "unexpected keys" not in msg  # same names, other widths
    mismatched = [k for k, v in tiny.state_dict().items() if v.shape != state[k].shape]
    assert len(mismatched) > 12 and _listed(msg, "shape mismatches") == len(mismatched)
    assert "encoder.blocks.0.norm1.weight: file (384,) vs model (192,)" in msg  # both shapes, by name
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())  # nothing half-loaded


def test_other_depth_and_other_method_list_missing_and_unexpected_keys(tmp_path):
    deep = _method("model.depth=2")
    shallow = _method()
    with pytest.raises(CheckpointError) as err:
        load_state_strict(shallow, deep.state_dict(), "deep.ckpt")
    msg = str(err.value)
    extra = sorted(set(deep.state_dict()) - set(shallow.state_dict()))
    assert re.search(r"unexpected keys(?: \(\d+\))?: encoder\.blocks\.1\.", msg)
    assert _listed(msg, "unexpected keys") == len(extra)
    assert "missing keys" not in msg and "deep.ckpt" in msg
    with pytest.raises(CheckpointError) as err:
        load_state_strict(deep, shallow.state_dict(), "shallow.ckpt")
    assert re.search(r"missing keys(?: \(\d+\))?: encoder\.blocks\.1\.", str(err.value))
    assert _listed(str(err.value), "missing keys") == len(extra)

    simmim = _method("method=simmim")
    with pytest.raises(CheckpointError) as err:
        load_state_strict(simmim, shallow.state_dict(), "mae.ckpt")
    msg = str(err.value)
    missing = set(simmim.state_dict()) - set(shallow.state_dict())
    unexpected = set(shallow.state_dict()) - set(simmim.state_dict())
    assert missing and unexpected
    assert _listed(msg, "missing keys") == len(missing) and _listed(msg, "unexpected keys") == len(unexpected)
    assert any(k in msg for k in unexpected) and "mae.ckpt" in msg


def test_matching_weights_load_exactly():
    a, b = _method(), _method()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    load_state_strict(b, a.state_dict(), "a.ckpt")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in b.state_dict().items())


def test_checkpoint_whose_config_does_not_match_its_weights_names_the_file(tmp_path):
    """A hand-edited (or mixed-up) checkpoint: config says vit_tiny, weights are vit_small."""
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _save_ckpt(path, _cfg("model.encoder=vit_tiny"), _method("model.encoder=vit_small"))
    with pytest.raises(CheckpointError) as err:
        method_from_checkpoint(find_checkpoint(tmp_path / "run"))
    msg = str(err.value)
    assert str(path) in msg and "shape mismatches" in msg and "file (384,) vs model (192,)" in msg
    # channel count in the data block decides the patch embedding: 3-channel weights into a 1-channel model
    other = tmp_path / "rgb.ckpt"
    _save_ckpt(other, _cfg(), _method(channels=3), channels=1)
    with pytest.raises(CheckpointError, match=r"rgb\.ckpt.*encoder\.patch_embed\.proj\.weight: file \(192, 3, 4, 4\) "
                                              r"vs model \(192, 1, 4, 4\)"):
        method_from_checkpoint(other)
    _save_ckpt(tmp_path / "ok.ckpt", _cfg(), _method())  # the same files, consistent: loads
    method, cfg, _ = method_from_checkpoint(tmp_path / "ok.ckpt")
    assert cfg.model.encoder == "vit_tiny" and not method.training


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_code_running_last_ckpt_in_a_run_folder_is_refused(tmp_path):
    """The path eval/visualize/report take (run folder -> checkpoints/last.ckpt -> method)."""
    marker = tmp_path / "pwned"
    good = tmp_path / "good.ckpt"
    _save_ckpt(good, _cfg(), _method())
    ckpt = torch.load(good, weights_only=True)
    ckpt["metrics"] = {"loss": _Payload(marker)}  # a real mimkit checkpoint with one hostile object inside
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*last\.ckpt.*could execute code"):
        method_from_checkpoint(find_checkpoint(run))
    assert not marker.exists()


def test_malformed_checkpoints_are_refused_by_name(tmp_path):
    from mimkit.config import load_config
    from mimkit.engine.checkpoint import FORMAT, VERSION, CheckpointError, atomic_torch_save, load_state_strict
    from mimkit.engine.checkpoint import method_from_checkpoint as from_ckpt
    from mimkit.methods import build_method

    cfg = load_config(None, ["model.depth=1", "data.img_size=16", "model.decoder=tiny"])
    m = build_method(cfg, (16, 16), 1)
    with pytest.raises(CheckpointError, match=r"x.ckpt hold 1 value\(s\) that are not tensors: encoder.cls_token"):
        load_state_strict(m, {**m.state_dict(), "encoder.cls_token": 3}, "x.ckpt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_strict(m, [1, 2], "x.ckpt")
    base = {"format": FORMAT, "version": VERSION, "config": cfg.model_dump(mode="json"),
            "data": {"img_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.2]}, "model": m.state_dict()}
    for drop in ("model", "config", "data"):
        path = tmp_path / f"no_{drop}.ckpt"
        atomic_torch_save({k: v for k, v in base.items() if k != drop}, path)
        with pytest.raises(CheckpointError, match=rf"no_{drop}.ckpt has no {drop} section"):
            from_ckpt(path)
    path = tmp_path / "badcfg.ckpt"
    atomic_torch_save({**base, "config": {**base["config"], "optim": {"lrr": 1}}}, path)
    with pytest.raises(CheckpointError, match=r"(?s)badcfg.ckpt are not valid.*optim.lrr"):
        from_ckpt(path)
