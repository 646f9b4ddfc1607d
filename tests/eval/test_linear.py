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


def test_each_stacked_head_trains_as_its_own_torch_sgd_head():
    """The sweep's hand-written update (one tensor for all heads) against torch.optim.SGD with momentum, weight
    decay and a cosine LambdaLR, one nn.Linear per lr, on the same batches and the same initial weights."""
    import math

    import torch.nn as nn
    import torch.nn.functional as F

    from mimkit.eval.linear import shuffled_batches, train_linear_sweep

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 12, generator=g), torch.randint(0, 4, (300,), generator=g)
    lrs, epochs, batch, wd = (0.01, 0.3, 2.0), 3, 64, 1e-3
    model = train_linear_sweep(x, y, 4, lrs, epochs, batch, wd, seed=5)
    torch.manual_seed(5)
    start = torch.empty(len(lrs), 4, 12)
    nn.init.trunc_normal_(start, std=0.01)  # the sweep's init, drawn right after the same seeding
    steps = epochs * math.ceil(300 / batch)
    for h, lr in enumerate(lrs):
        bn, head = nn.BatchNorm1d(12, affine=False, eps=1e-6), nn.Linear(12, 4)
        with torch.no_grad():
            head.weight.copy_(start[h])
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        for idx in shuffled_batches(300, batch, epochs, seed=5):
            loss = F.cross_entropy(head(bn(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        assert torch.allclose(model.weight[h], head.weight, atol=1e-5, rtol=1e-4), lr
        assert torch.allclose(model.bias[h], head.bias, atol=1e-5, rtol=1e-4), lr
        assert not torch.allclose(head.weight, start[h], atol=1e-3)  # it really trained
