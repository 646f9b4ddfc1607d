import torch

from mimkit.eval import finetune
from mimkit.backends import MimkitEncoder
from mimkit.eval.finetune import Classifier, random_init, set_drop_path
from mimkit.models import VisionTransformer


def _encoder():
    torch.manual_seed(0)  # patch 4 on 8x8 digits: 4 tokens, learns within a few dozen steps
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return MimkitEncoder(vit, 1, vit.depth, vit.embed_dim)


def test_finetune_recipe_improves_over_chance_on_a_tiny_subset_and_leaves_the_encoder_alone(digits):
    train, test = digits
    enc = _encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    kw = dict(max_steps=80, epochs=20, batch_size=32, blr=5e-2, train_limit=400, test_limit=300, hflip=False)
    runs = [finetune(enc, train, test, 10, from_scratch=s, **kw) for s in (False, True)]
    for r in runs:  # MAE recipe: mixup + cutmix + smoothing + drop path + layer decay, chance is 0.10
        assert r["steps"] == 80 and r["test_acc"] > 0.4 and r["loss_last"] < r["loss_first"]
        assert r["drop_path_blocks"] == 2 and r["mixup"] > 0 and r["cutmix"] > 0 and r["smoothing"] > 0
    assert [r["from_scratch"] for r in runs] == [False, True]
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_from_scratch_reinitialises_the_same_architecture():
    enc = _encoder()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    fresh = random_init(enc)
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert not torch.equal(fresh.model.blocks[0].attn.qkv.weight, enc.model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(fresh.model.pos_embed, enc.model.pos_embed - 1.0)  # fixed sin-cos table


def test_layer_decay_groups_and_drop_path():
    from timm.layers import DropPath
    from timm.optim import param_groups_layer_decay

    model = Classifier(_encoder(), 10)
    scales = {}
    for g in param_groups_layer_decay(model, 0.05, layer_decay=0.5):
        for p in g["params"]:
            scales[id(p)] = g["lr_scale"]
    names = dict(model.named_parameters())
    # 4 layers: stem, block 0, block 1 (+ final norm), head
    assert scales[id(names["head.weight"])] == 1.0
    assert scales[id(names["encoder.model.blocks.1.mlp.fc1.weight"])] == 0.5
    assert scales[id(names["encoder.model.norm.weight"])] == 0.5
    assert scales[id(names["encoder.model.blocks.0.mlp.fc1.weight"])] == 0.25
    assert scales[id(names["encoder.model.patch_embed.proj.weight"])] == 0.125
    enc = _encoder()
    assert set_drop_path(enc, 0.2) == 2
    assert isinstance(enc.model.blocks[1].drop_path1, DropPath) and enc.model.blocks[1].drop_path1.drop_prob == 0.2


def test_finetune_is_reproducible_for_a_seed(digits):
    train, test = digits
    kw = dict(max_steps=6, epochs=1, batch_size=32, blr=5e-2, train_limit=200, test_limit=100, hflip=False)
    a = finetune(_encoder(), train, test, 10, seed=3, **kw)
    b = finetune(_encoder(), train, test, 10, seed=3, **kw)
    assert a["test_acc"] == b["test_acc"] and a["loss_last"] == b["loss_last"]
