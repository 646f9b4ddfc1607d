import torch

from mimkit.eval import extract_features, few_shot, layerwise_probe
from mimkit.eval.fewshot import sample_shots


def test_few_shot_gives_mean_and_std_over_seeds(digits_pixels):
    xtr, ytr, xte, yte = digits_pixels
    r = few_shot(xtr, ytr, xte, yte, shots=(1, 5), seeds=(0, 1, 2))
    assert [row["shots"] for row in r["results"]] == [1, 5]
    one, five = r["results"]
    assert len(one["accs"]) == 3 and one["std"] > 0
    assert abs(one["mean"] - sum(one["accs"]) / 3) < 1e-9
    assert five["mean"] > one["mean"] and five["mean"] > 0.7  # chance is 0.10
    c = few_shot(xtr, ytr, xte, yte, shots=(5,), seeds=(0, 1), classifier="centroid")
    assert c["results"][0]["mean"] > 0.7


def test_shots_are_k_per_class_and_depend_on_the_seed():
    labels = torch.arange(100) % 10
    idx = sample_shots(labels, 3, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [3] * 10
    assert not torch.equal(idx, sample_shots(labels, 3, seed=1))


def test_layerwise_probe_returns_one_score_per_block(digits, tiny_vit):
    train, test = digits
    enc = tiny_vit(depth=3)
    r = layerwise_probe(enc, train, test, pool="mean", lrs=(0.1, 1.0), epochs=10, batch_size=64)
    assert [row["layer"] for row in r["layers"]] == [0, 1, 2]
    assert all(0.5 < row["test_acc"] <= 1 for row in r["layers"])  # chance is 0.10
    assert r["best_layer"] == max(r["layers"], key=lambda row: row["val_acc"])["layer"]


def test_features_from_chosen_layers(digits, tiny_vit):
    train, _ = digits
    enc = tiny_vit(depth=3)
    last, _ = extract_features(enc, train, pool="cls", limit=20)
    layers, _ = extract_features(enc, train, pool="cls", layers=[0, -1], limit=20)
    assert layers.shape == (20, 64)
    with torch.no_grad():  # the last block's tokens, normed, are the encoder's output
        raw = enc.forward_layers(train.images[:20], [2])[0]
        torch.testing.assert_close(enc.model.norm(raw)[:, 0], last)
        torch.testing.assert_close(layers[:, 32:], raw[:, 0])
