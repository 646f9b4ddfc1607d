import torch

from mimkit.eval import extract_features, linear_probe
from mimkit.eval.linear import carve_val

LRS = (0.001, 0.01, 0.1, 1.0)


def test_linear_probe_on_digits_beats_chance_by_far(digits_pixels):
    xtr, ytr, xte, yte = digits_pixels
    r = linear_probe(xtr, ytr, xte, yte, lrs=LRS, epochs=15, batch_size=128)
    assert r["test_acc"] > 0.85  # chance is 0.10
    assert [row["lr"] for row in r["sweep"]] == list(LRS)
    assert r["val_acc"] == max(row["val_acc"] for row in r["sweep"])
    assert r["best_lr"] == next(row["lr"] for row in r["sweep"] if row["val_acc"] == r["val_acc"])
    assert r["train_size"] + r["val_size"] == len(ytr)


def test_linear_probe_on_frozen_vit_features(digits, tiny_vit):
    train, test = digits
    enc = tiny_vit()
    xtr, ytr = extract_features(enc, train, pool="mean")
    xte, yte = extract_features(enc, test, pool="mean")
    assert linear_probe(xtr, ytr, xte, yte, lrs=LRS, epochs=10)["test_acc"] > 0.5


def test_the_test_split_never_influences_the_choice(digits_pixels):
    xtr, ytr, xte, yte = digits_pixels
    g = torch.Generator().manual_seed(1)
    shuffled = yte[torch.randperm(len(yte), generator=g)]
    a = linear_probe(xtr, ytr, xte, yte, lrs=LRS, epochs=5)
    b = linear_probe(xtr, ytr, xte + torch.randn(xte.shape, generator=g), shuffled, lrs=LRS, epochs=5)
    assert a["best_lr"] == b["best_lr"] and a["sweep"] == b["sweep"] and a["val_acc"] == b["val_acc"]
    assert b["test_acc"] < 0.3 < a["test_acc"]  # the test labels really were destroyed


def test_validation_split_is_carved_from_train_only():
    tr, va = carve_val(torch.arange(100), 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(va, carve_val(torch.arange(100), 0.2, seed=3)[1])
