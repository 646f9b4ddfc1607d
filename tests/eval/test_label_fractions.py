"""Label-fraction protocol, baselines and the fine-tuning lr sweep: fixed nested class-balanced subsets, no
test image in any choice, every row through the same code."""

import copy

import pytest
import torch

from mimkit.config import ConfigError, EvalConfig, PretrainConfig, apply_overrides
from mimkit.eval.baselines import PixelEncoder, baseline_encoders
from mimkit.eval.finetune import RECIPES, finetune_sweep, recipe_settings
from mimkit.eval.labels import aggregate_tables, fraction_splits, label_table, parse_cells, table_lines
from mimkit.eval.protocols import run_protocol, summary_line
from mimkit.eval.splits import carve_balanced_val, dataset_labels, label_subsets, per_class_subset

FRACTIONS = (0.01, 0.1, 1.0)


def _unbalanced_labels():
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([1000, 700, 300, 2000, 1000])])
    return labels[torch.randperm(labels.numel(), generator=g)]


def test_subsets_are_fixed_nested_class_balanced_and_outside_the_validation_split():
    labels = _unbalanced_labels()
    pool, val = carve_balanced_val(labels, 0.1, seed=0)
    assert not set(pool.tolist()) & set(val.tolist()) and pool.numel() + val.numel() == labels.numel()
    for c, n in enumerate([1000, 700, 300, 2000, 1000]):
        assert int((labels[val] == c).sum()) == round(0.1 * n)
    subsets = label_subsets(labels, FRACTIONS, seed=0, pool=pool)
    again = label_subsets(labels, FRACTIONS, seed=0, pool=pool)
    assert all(torch.equal(subsets[f], again[f]) for f in FRACTIONS)  # seeded: the same sets every call
    other = label_subsets(labels, FRACTIONS, seed=1, pool=pool)
    assert not torch.equal(subsets[0.1], other[0.1])
    sets = [set(subsets[f].tolist()) for f in FRACTIONS]
    assert sets[0] < sets[1] < sets[2] == set(pool.tolist())  # nested; 100% = every image outside val
    assert not sets[2] & set(val.tolist())
    for f in FRACTIONS:
        for c in range(5):
            in_pool = int((labels[pool] == c).sum())
            assert int((labels[subsets[f]] == c).sum()) == max(1, round(f * in_pool))  # per class
    # asking for 1% alone gives the same 1% as asking for all three
    assert torch.equal(label_subsets(labels, [0.01], seed=0, pool=pool)[0.01], subsets[0.01])
    fixed = per_class_subset(labels, 50, seed=0, pool=pool)  # the same order: nested with the fractions
    assert sets[0] < set(fixed.tolist()) < sets[2] and {int((labels[fixed] == c).sum()) for c in range(5)} == {50}
    assert set(per_class_subset(labels, 3, seed=0, pool=pool).tolist()) < sets[0]  # 3 <= every class's 1%


def test_labels_are_read_from_the_source_table_in_dataset_order(digits):
    train, _ = digits
    sub = torch.utils.data.Subset(train, [5, 3, 9])
    assert dataset_labels(sub).tolist() == [int(train[i]["label"]) for i in (5, 3, 9)]


def _small_cfg(**kw) -> EvalConfig:
    base = dict(label_cells=["knn@1", "linear@0.1", "linear@1", "finetune@0.1"], linear_lrs=[0.01, 0.1, 1.0],
                linear_epochs=10, finetune_max_steps=25, finetune_batch_size=32, finetune_blrs=[1e-3, 3e-2],
                pool="mean", batch_size=256)
    return EvalConfig(**{**base, **kw})


def _poisoned(test):
    """The test split with noise images and shuffled labels."""
    g = torch.Generator().manual_seed(7)
    bad = copy.copy(test)
    bad.images = torch.randn(test.images.shape, generator=g)
    bad.labels = test.labels[torch.randperm(len(test), generator=g)]
    return bad


def test_no_test_image_chooses_anything_in_the_label_table(digits, tiny_vit):
    train, test = digits
    cfg, enc = _small_cfg(), tiny_vit(depth=2)
    clean = label_table({"pretrained": enc}, train, test, cfg)
    dirty = label_table({"pretrained": enc}, train, _poisoned(test), cfg)
    for cell in ("linear@0.1", "linear@1"):
        a, b = clean["rows"]["pretrained"][cell], dirty["rows"]["pretrained"][cell]
        assert a["sweep"] == b["sweep"] and a["best_lr"] == b["best_lr"]
    a, b = clean["rows"]["pretrained"]["finetune@0.1"], dirty["rows"]["pretrained"]["finetune@0.1"]
    assert [r["val_acc"] for r in a["sweep"]] == [r["val_acc"] for r in b["sweep"]] and a["blr"] == b["blr"]
    assert clean["splits"] == {**dirty["splits"], "test_size": clean["splits"]["test_size"]}
    assert clean["rows"]["pretrained"]["linear@1"]["value"] > 0.3 > dirty["rows"]["pretrained"]["linear@1"]["value"]


def test_the_index_sets_come_from_the_training_labels_alone(digits):
    train, _ = digits
    s = fraction_splits(train, _small_cfg())
    n = len(train)
    assert int(s["val"].max()) < n and int(s["subsets"][1.0].max()) < n
    assert set(s["subsets"][0.1].tolist()) < set(s["subsets"][1.0].tolist())
    assert not set(s["subsets"][1.0].tolist()) & set(s["val"].tolist())


def _patch4_vit():
    """Patch 4 on 8x8 digits (4 tokens): fine-tuning learns within a few dozen steps."""
    from mimkit.backends import MimkitEncoder
    from mimkit.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return MimkitEncoder(vit, 1, vit.depth, vit.embed_dim)


def test_finetune_sweep_keeps_the_best_val_lr_and_scores_only_it(digits):
    train, test = digits
    tr, va = torch.utils.data.Subset(train, range(0, 600)), torch.utils.data.Subset(train, range(600, 900))
    kw = dict(max_steps=60, batch_size=32, mixup=0.0, cutmix=0.0, drop_path=0.0, shift=1, hflip=False)
    a = finetune_sweep(_patch4_vit(), tr, va, test, 10, [1e-5, 5e-2], **kw)
    b = finetune_sweep(_patch4_vit(), tr, va, _poisoned(test), 10, [1e-5, 5e-2], **kw)
    assert [r["blr"] for r in a["sweep"]] == [1e-5, 5e-2]
    assert a["val_acc"] == max(r["val_acc"] for r in a["sweep"]) and a["blr"] == b["blr"] == 5e-2
    assert [r["val_acc"] for r in a["sweep"]] == [r["val_acc"] for r in b["sweep"]]
    assert a["test_acc"] > 0.3 > b["test_acc"]  # chance is 0.10: the poison really changed the test split
    with pytest.raises(ValueError, match="validation split"):
        finetune_sweep(_patch4_vit(), tr, None, test, 10, [1e-5, 5e-2], **kw)


def test_baselines_run_every_row_through_the_same_protocols(digits, tiny_vit):
    train, test = digits
    enc = tiny_vit(depth=2)
    rows = baseline_encoders(enc, train, seed=0)
    assert list(rows) == ["pretrained", "random_init", "raw_pixels"]
    assert not torch.equal(rows["random_init"].model.blocks[0].attn.qkv.weight, enc.model.blocks[0].attn.qkv.weight)
    x = torch.stack([train[i]["image"] for i in range(4)])
    assert torch.equal(PixelEncoder((1, 8, 8))(x)[:, 1], x.flatten(1))
    res = run_protocol("baselines", enc, train, test, _small_cfg())
    d = res["details"]
    assert set(d["rows"]) == {"pretrained", "random_init", "raw_pixels"} and d["cells"] == _small_cfg().label_cells
    assert res["metric"] == "top1_knn@1" and res["value"] == d["rows"]["pretrained"]["knn@1"]["value"]
    assert d["rows"]["raw_pixels"]["finetune@0.1"] is None  # nothing to fine-tune
    assert d["rows"]["raw_pixels"]["linear@1"]["value"] > 0.85  # digits pixels are linearly separable
    for cell in ("linear@0.1", "linear@1"):  # the same splits for every row
        sizes = {(r[cell]["train_size"], r[cell]["val_size"], r[cell]["test_size"]) for r in d["rows"].values()}
        assert len(sizes) == 1
    assert d["rows"]["random_init"]["finetune@0.1"]["steps"] == d["rows"]["pretrained"]["finetune@0.1"]["steps"]
    lines = summary_line(res).splitlines()
    assert lines[1].startswith("| encoder |") and lines[-1].startswith("| raw_pixels |") and "n/a" in lines[-1]


def test_label_protocol_output_keys_and_shape(digits, tiny_vit):
    train, test = digits
    cfg = _small_cfg(label_cells=["linear@0.01", "linear@0.1", "linear@1", "finetune@0.01"])
    res = run_protocol("labels", tiny_vit(depth=2), train, test, cfg)
    d = res["details"]
    assert {"protocol", "metric", "value", "details", "seconds"} <= set(res) and res["protocol"] == "labels"
    assert list(d["rows"]) == ["pretrained"] and list(d["rows"]["pretrained"]) == cfg.label_cells
    assert set(d["splits"]["subsets"]) == {"0.01", "0.1", "1"}
    per_class = d["splits"]["subsets"]["0.01"]["per_class"]
    assert set(per_class) == set(range(10)) and set(per_class.values()) == {1}  # at least one per class
    for cell, r in d["rows"]["pretrained"].items():
        assert 0 <= r["value"] <= 1 and r["train_size"] == d["splits"]["subsets"][cell.split("@")[1]]["size"]
    assert d["rows"]["pretrained"]["finetune@0.01"]["val_size"] == d["splits"]["val_size"]
    agg = aggregate_tables([d, d])
    assert agg["pretrained"]["linear@1"]["std"] == 0.0 and agg["pretrained"]["linear@1"]["n"] == 2
    assert table_lines(d)[0] == "| encoder | linear@0.01 | linear@0.1 | linear@1 | finetune@0.01 |"


def test_recipe_settings_and_cells_are_checked():
    small, imagenet = recipe_settings(EvalConfig()), recipe_settings(EvalConfig(finetune_recipe="imagenet"))
    assert small["mixup"] == RECIPES["small"]["mixup"] and imagenet["mixup"] == 0.8 and imagenet["max_steps"] is None
    assert recipe_settings(EvalConfig(mixup=0.3, finetune_max_steps=0))["mixup"] == 0.3
    assert recipe_settings(EvalConfig(finetune_max_steps=0))["max_steps"] is None
    with pytest.raises(ConfigError, match="eval.label_cells"):
        apply_overrides(PretrainConfig(), ["eval.label_cells=[linear@2]"])
    with pytest.raises(ValueError, match="protocol@fraction"):
        parse_cells(["probe@0.1"])


def test_settings_stored_before_recipes_follow_the_recipe_unless_chosen():
    old = {"finetune_blr": 1e-3, "finetune_epochs": 5, "mixup": 0.8, "cutmix": 0.5, "layer_decay": 0.75}
    cfg = EvalConfig(**old)
    assert cfg.mixup is None and cfg.layer_decay is None and cfg.finetune_blrs is None and cfg.cutmix == 0.5
    assert EvalConfig(finetune_blr=2e-3).finetune_blrs == [2e-3]


def test_cli_baselines_table_on_fashion_mnist(tmp_path, fashion_mnist_dir, capsys):
    import json

    from mimkit.cli import main
    from mimkit.interop import save_method_checkpoint
    from mimkit.methods import build_method

    torch.manual_seed(0)
    cfg = PretrainConfig(model={"encoder": "vit_tiny", "patch_size": 7, "depth": 2})
    method = build_method(cfg, (28, 28), 1)
    meta = {"img_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}
    save_method_checkpoint(method.eval(), cfg, meta, tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert main(["eval", str(tmp_path / "run"), "--protocol", "baselines", "eval.train_limit=500",
                 "eval.test_limit=100", "eval.label_cells=[knn@1,linear@0.1,finetune@0.1]", "eval.linear_epochs=2",
                 "eval.finetune_max_steps=2", "eval.finetune_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "| encoder | knn@1 | linear@0.1 | finetune@0.1 |" in out and "| raw_pixels |" in out
    res = json.loads((tmp_path / "run" / "eval" / "baselines.json").read_text())
    splits = res["details"]["splits"]
    assert splits["val_size"] + splits["pool_size"] == 500 and splits["test_size"] == 100
    assert res["details"]["rows"]["raw_pixels"]["linear@0.1"]["value"] > 0.3  # chance is 0.10


def test_the_recipe_search_uses_training_images_only_inside_the_protocols_splits(digits):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "finetune_search.py"
    spec = importlib.util.spec_from_file_location("finetune_search", path)
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    train, _ = digits
    tr, va, labels = search.splits(train, train_per_class=20, val_per_class=5, val_fraction=0.1, seed=0)
    pool, val = carve_balanced_val(dataset_labels(train), 0.1, seed=0)
    assert set(tr.tolist()) <= set(pool.tolist()) and set(va.tolist()) <= set(val.tolist())
    assert {int((labels[tr] == c).sum()) for c in range(10)} == {20}
    assert {int((labels[va] == c).sum()) for c in range(10)} == {5}
