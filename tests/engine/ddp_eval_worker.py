"""Run by test_engine_ddp_eval under `python -m torch.distributed.run --nproc_per_node=2` (CPU, gloo).

usage:
  ddp_eval_worker.py features RESULT_PREFIX
      sharded feature extraction: every rank writes RESULT_PREFIX.rank<r>.pt with the features it got back
      and how many images its own encoder saw
  ddp_eval_worker.py resume OUT_DIR RESULT_FILE STOP_STEP [key=value ...]
      a DDP run stopped after STOP_STEP steps (its run folder is copied to <OUT_DIR>/ddp_stop for a later
      one-process resume), then resumed under DDP to the end; rank 0 saves histories, final weights, metrics
"""

from __future__ import annotations

import gzip
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_tiny import FMNIST, FOOLBOX, tiny_config, tiny_data  # noqa: E402

N_BANK, N_QUERY, QUERY_LIMIT = 67, 33, 31  # odd counts: the ranks get unequal shares


class Labelled(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def labelled_images(n: int = N_BANK + N_QUERY, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n real grey images [n, 1, size, size] (standardised) with their class labels: the first Fashion-MNIST
    test images, else the foolbox sample PNGs (the label is the last number of the file name)."""
    if (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz", "rb") as fh:
            raw = np.frombuffer(fh.read(16 + n * 784), np.uint8, offset=16).reshape(n, 1, 28, 28)
        with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
            labels = np.frombuffer(fh.read(8 + n), np.uint8, offset=8)
        x = torch.from_numpy(raw.copy()).float() / 255
    else:
        from PIL import Image

        files = sorted(FOOLBOX.glob("*.png"))[:n]
        x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("L").resize((28, 28))) for f in files])
                             [:, None].copy()).float() / 255
        labels = np.array([int(re.findall(r"(\d+)\.png$", f.name)[0]) % 10 for f in files])
    o = (28 - size) // 2
    x = x[:, :, o:o + size, o:o + size]
    x = (x - x.mean()) / x.std()
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def eval_sets() -> tuple[Labelled, Labelled]:
    x, y = labelled_images()
    return Labelled(x[:N_BANK], y[:N_BANK]), Labelled(x[N_BANK:], y[N_BANK:])


def eval_encoder():
    from mimkit.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer.from_preset("vit_tiny", 16, 4, 1, depth=3)


def features_main(prefix: str) -> None:
    import torch.distributed as dist

    from mimkit.eval import extract_features, extract_layer_features, knn_classify

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    encoder = eval_encoder()
    seen = [0]
    encoder.patch_embed.register_forward_hook(lambda m, inp, out: seen.__setitem__(0, seen[0] + inp[0].shape[0]))
    bank, queries = eval_sets()
    xb, yb = extract_features(encoder, bank, batch_size=8, distributed=True)
    xq, yq = extract_features(encoder, queries, batch_size=8, limit=QUERY_LIMIT, distributed=True)
    layers, ly = extract_layer_features(encoder, queries, [0, -1], pool="mean", batch_size=8, distributed=True)
    pred = knn_classify(xb, yb, xq, k=5, temperature=0.07, num_classes=10)
    torch.save({"rank": rank, "world": dist.get_world_size(), "seen": seen[0], "bank": (xb, yb),
                "queries": (xq, yq), "layers": (layers, ly), "pred": pred}, f"{prefix}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def resume_main(out_dir: str, result_file: str, stop: str, *overrides: str) -> None:
    import torch.distributed as dist

    from mimkit.engine import train
    from mimkit.engine.checkpoint import load_checkpoint

    out = Path(out_dir)
    first = train(tiny_config(out, "trainer.strategy=ddp", "trainer.run_name=ddp",
                              f"trainer.stop_after_steps={stop}", *overrides), data=tiny_data())
    if first.is_global_zero:
        shutil.copytree(out / "ddp", out / "ddp_stop")
        ckpt = load_checkpoint(out / "ddp" / "checkpoints" / "last.ckpt")
        progress = ckpt["progress"]
    dist.barrier()
    second = train(tiny_config(out, "trainer.strategy=ddp", "trainer.run_name=ddp", *overrides),
                   resume=str(out / "ddp"), data=tiny_data())
    if second.is_global_zero:
        torch.save({"world": second.world_size, "progress_at_stop": progress,
                    "history": first.history + second.history, "stopped": first.metrics["stopped_early"],
                    "metrics": second.metrics,
                    "state": {k: v.detach().cpu() for k, v in second.method.state_dict().items()}}, result_file)


def main() -> None:
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    {"features": features_main, "resume": resume_main}[mode](*args)


if __name__ == "__main__":
    main()
