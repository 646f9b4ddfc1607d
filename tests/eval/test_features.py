import torch
from torch.utils.data import DataLoader, Dataset

from mimkit.eval import extract_features
from mimkit.models import VisionTransformer, pool


class Toy(Dataset):
    def __init__(self, n=10, c=1, size=8):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, c, size, size, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i % 3, "seed": i, "path": None}


def _encoder():
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def test_features_match_direct_encoding_in_order():
    ds, enc = Toy(), _encoder()
    enc.train()
    feats, labels = extract_features(enc, ds, pool="cls", batch_size=4, device="cpu")
    assert feats.shape == (10, 32) and feats.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == [i % 3 for i in range(10)]
    enc.eval()
    with torch.no_grad():
        ref = pool(enc(ds.images), "cls")
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    mean_feats, _ = extract_features(enc, ds, pool="mean", batch_size=3, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(mean_feats, pool(enc(ds.images), "mean"), rtol=1e-5, atol=1e-5)


def test_mode_is_restored_and_limit_and_loader_work():
    ds, enc = Toy(), _encoder()
    enc.train()
    feats, labels = extract_features(enc, ds, batch_size=4, limit=5)
    assert enc.training
    assert feats.shape == (5, 32) and labels.tolist() == [0, 1, 2, 0, 1]
    loader = DataLoader(ds, batch_size=4, collate_fn=lambda items: {
        "image": torch.stack([it["image"] for it in items]), "label": torch.tensor([it["label"] for it in items])})
    f2, l2 = extract_features(enc, loader, limit=6)
    assert f2.shape == (6, 32) and l2.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(f2[:5], feats)
