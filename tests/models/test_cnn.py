import timm
import torch
import torch.nn as nn

from mimkit.backends import wrap_mimkit
from mimkit.eval.features import extract_features, extract_layer_features
from mimkit.models.cnn import ResNetEncoder


def test_tokens_are_gap_then_last_map_cells_and_layers_follow_the_same_layout():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18", 32, 3, patch_size=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = enc.forward_maps(x)
        tokens = enc(x)
        layers = enc.forward_layers(x, [0, -1, 2])
    assert enc.depth == 4 and enc.embed_dim == 512 and enc.grid.shape == (8, 8)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert tokens.shape == (2, 1 + 16, 512)
    torch.testing.assert_close(tokens[:, 0], maps[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(tokens[:, 1:], maps[-1].flatten(2).transpose(1, 2))
    assert tokens[0, 1 + 4 * 1 + 2].equal(maps[-1][0, :, 1, 2])  # raster order: row 1, column 2
    torch.testing.assert_close(layers[0], ResNetEncoder.tokens(maps[0]))
    torch.testing.assert_close(layers[1], tokens)
    torch.testing.assert_close(layers[2], ResNetEncoder.tokens(maps[2]))
    assert enc.map_shapes()[1] == [tuple(m.shape[2:]) for m in maps]
    assert enc.input_strides() == [1, 1, 2, 4] and enc.out_stride == 8


def test_weights_load_into_timm_with_timm_names():
    enc = ResNetEncoder("resnet18", 32, 1, patch_size=4).eval()
    ref = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    ref.load_state_dict(enc.state_dict(), strict=True)  # same keys and shapes
    ref.conv1.stride, ref.maxpool = (1, 1), nn.Identity()  # the small-input stem, as documented
    ref.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x), enc.forward_maps(x)[-1])
    # at ImageNet-like sizes the stem is timm's own, untouched
    big = ResNetEncoder("resnet18", 64, 3, patch_size=16).eval()
    assert not big.small_stem and big.out_stride == 32
    ref = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=0).eval()
    ref.load_state_dict(big.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x), big.forward_maps(x)[-1])


def test_odd_sizes_and_depth_override():
    enc = ResNetEncoder("resnet18", 28, 1, patch_size=4, depth=2)
    assert enc.depth == 2 and enc.embed_dim == 128 and not hasattr(enc, "layer3")
    x = torch.randn(2, 1, 28, 28)
    maps = enc.forward_maps(x)
    assert [tuple(m.shape[2:]) for m in maps] == enc.map_shapes()[1] == [(28, 28), (14, 14)]
    full = ResNetEncoder("resnet18", 28, 1, patch_size=4)
    assert full.map_shapes()[1][-1] == tuple(full.forward_maps(x)[-1].shape[2:]) == (4, 4)  # ceil at 7 -> 4


def test_meets_the_evaluation_contract():
    enc = ResNetEncoder("resnet18", 16, 1, patch_size=4)
    loaded = wrap_mimkit(enc, {"img_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5]})
    data = [{"image": torch.randn(1, 16, 16), "label": i % 2} for i in range(6)]
    feats, labels = extract_features(loaded.encoder, data, pool="cls", batch_size=4)
    assert feats.shape == (6, 512) and labels.tolist() == [0, 1] * 3
    mean_feats, _ = extract_features(loaded.encoder, data, pool="mean", batch_size=4)
    torch.testing.assert_close(feats, mean_feats, rtol=1e-4, atol=1e-5)  # GAP == mean of the cells
    per_layer, _ = extract_layer_features(loaded.encoder, data, [0, 1], batch_size=4)
    assert [f.shape for f in per_layer] == [(6, 64), (6, 128)]
    concat, _ = extract_features(loaded.encoder, data, batch_size=4, layers=[1, -1])
    assert concat.shape == (6, 128 + 512)
