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
    return data.source in ("fashion_mnist", "imagefolder", "torchvision")


def reconstruction_batch(cfg, mean, std, num_images: int, seed: int = 0) -> dict:
    """A fixed batch of un-augmented images with fixed per-image seeds, for comparable pictures."""
    from mimkit.data.build import build_labelled, build_pretrain_data
    from mimkit.data.dataset import fixed_batch

    data = with_stats(cfg.data, mean, std)
    if has_labels(data):
        dataset = build_labelled(data, "test", mean, std)
    else:
        bundle = build_pretrain_data(data)
        dataset = bundle.val if len(bundle.val) else bundle.train
    return fixed_batch(dataset, num_images, seed)
