"""The images a run's pictures and kNN figures are made of: its data section with the statistics it trained with,
whether its source has labels, and a fixed batch of un-augmented images (for pictures comparable across runs)."""

from __future__ import annotations

from mimkit.config import DataConfig


def with_stats(data: DataConfig, mean, std) -> DataConfig:
    """The run's data section with the normalisation it trained with (so nothing is recomputed)."""
    return data.model_copy(update={"mean": list(mean), "std": list(std)})


def has_labels(data: DataConfig) -> bool:
    if data.source == "shards":  # labelled when the shards hold <key>.cls members
        from mimkit.data.shards import ShardSource

        return bool(data.path) and ShardSource(data.path).labelled
    return data.source in ("fashion_mnist", "idx", "imagefolder", "torchvision")


def reconstruction_batch(cfg, mean, std, num_images: int, seed: int = 0, notes: list[str] | None = None) -> dict:
    """A fixed batch of un-augmented images with fixed per-image seeds, for comparable pictures.

    Labelled sources draw from the test split; others from the held-out (val) split, topped up from the
    training images (without augmentation) when it holds fewer than `num_images`. When fewer images
    exist than asked for, or the training split had to be used, a line saying so is appended to `notes`.
    """
    import torch

    from mimkit.data.build import build_labelled, build_pretrain_data
    from mimkit.data.dataset import MIMDataset, fixed_batch

    data = with_stats(cfg.data, mean, std)
    if has_labels(data):
        dataset = build_labelled(data, "test", mean, std)
        where = "test split"
    else:
        bundle = build_pretrain_data(data)
        n_val = len(bundle.val)
        indices = bundle.val.indices
        if n_val < num_images:  # the held-out images first, then training images, all with the eval transform
            indices = torch.cat([indices, bundle.train.indices[: num_images - n_val]])
            if notes is not None and len(indices) > n_val:
                notes.append(f"the held-out split has {n_val} image(s); {len(indices) - n_val} more are drawn "
                             "from the training images (not augmented)")
        dataset = MIMDataset(bundle.train.source, indices, bundle.val.transform, data.on_error)
        where = "data"
    if notes is not None and len(dataset) < num_images:
        notes.append(f"asked for {num_images} images, drawing {len(dataset)}: that is all the {where} holds")
    return fixed_batch(dataset, num_images, seed)
