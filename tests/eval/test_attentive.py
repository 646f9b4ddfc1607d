import torch

from mimkit.eval import CrossAttentionPooler, EfficientProbe, attentive_probe, extract_tokens, trainable_parameters


def test_ep_has_fewer_trainable_parameters_than_the_cross_attention_pooler():
    for dim in (192, 384, 768):
        ca, ep = CrossAttentionPooler(dim, 1000, num_heads=8), EfficientProbe(dim, 1000, num_queries=32)
        assert trainable_parameters(ep) < trainable_parameters(ca)
        # EP: queries M*D + V D*D + head; the pooler adds q/k/v/o (4 D*D + 4 D) and a LayerNorm
        assert trainable_parameters(ep) == 32 * dim + dim * dim + dim * 1000 + 1000
    x = torch.randn(4, 16, 64)
    assert CrossAttentionPooler(64, 10)(x).shape == EfficientProbe(64, 10, num_queries=8)(x).shape == (4, 10)


def test_ep_pools_each_query_over_its_own_channel_slice():
    ep = EfficientProbe(8, 3, num_queries=2).eval()
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        attn = (ep.queries @ tokens.transpose(1, 2) / 8 ** 0.5).softmax(-1)  # [B, M, N]
        v = ep.v(tokens)  # [B, N, 8]: query 0 owns channels 0-3, query 1 channels 4-7
        z = torch.cat([torch.einsum("bn,bnk->bk", attn[:, 0], v[:, :, :4]),
                       torch.einsum("bn,bnk->bk", attn[:, 1], v[:, :, 4:])], dim=1)
        torch.testing.assert_close(ep(tokens), ep.head(z))


def test_attentive_probes_on_digits_tokens_beat_chance_and_ignore_test_labels(digits, tiny_vit):
    train, test = digits
    enc = tiny_vit()
    ttr, ytr = extract_tokens(enc, train)
    tte, yte = extract_tokens(enc, test)
    assert ttr.shape == (len(train), 1 + 16, 32) and ttr.dtype == torch.float16
    r = attentive_probe(ttr, ytr, tte, yte, epochs=6, lr=1e-2, num_heads=4, num_queries=8, batch_size=64)
    rows = {row["probe"]: row for row in r["rows"]}
    assert rows["efficient_probe"]["trainable_params"] < rows["cross_attention"]["trainable_params"]
    assert rows["efficient_probe"]["test_acc"] > 0.5 and rows["cross_attention"]["test_acc"] > 0.5
    shuffled = yte[torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))]
    r2 = attentive_probe(ttr, ytr, tte, shuffled, kinds=("efficient_probe",), epochs=6, lr=1e-2,
                         num_queries=8, batch_size=64)
    assert r2["rows"][0]["val_acc"] == rows["efficient_probe"]["val_acc"]


def test_too_short_a_budget_is_warned_about(digits, tiny_vit):
    from mimkit.eval.budget import still_learning

    # the rule on hand-made curves: 2 steps per epoch, last epoch mean 1.0 vs 2.0 before: a 50% drop
    warning = still_learning([2.2, 1.8, 1.1, 0.9], 2, "probe X", "eval.x_epochs")
    assert warning.startswith("probe X: the training loss still fell 50% over its last epoch (2.000 -> 1.000)")
    assert warning.endswith("raise eval.x_epochs")
    assert still_learning([1.0, 0.99, 0.98, 0.97], 2, "p", "s") is None  # 2% per epoch: trained out
    assert "half of its only epoch" in still_learning([3.0, 2.0, 1.0, 1.0], 4, "p", "s")
    assert still_learning([1.0], 4, "p", "s") is None  # too few steps to tell
    # a real probe: one epoch of a fresh pooler is still learning; the message names the field to raise
    train, test = digits
    enc = tiny_vit()
    ttr, ytr = extract_tokens(enc, train)
    tte, yte = extract_tokens(enc, test)
    short = attentive_probe(ttr, ytr, tte, yte, kinds=("efficient_probe",), epochs=1, lr=1e-2, num_queries=8,
                            batch_size=16)
    assert len(short["warnings"]) == 1 and "eval.attentive_epochs" in short["warnings"][0]
    assert "efficient_probe (1 epoch(s))" in short["warnings"][0]
