"""Weighted k-nearest-neighbour classification on cosine similarity (DINO's kNN protocol).

Each query takes its `k` most similar bank features (cosine similarity s), each voting for its label with
weight exp(s / T); the class with the largest total wins. Ties between classes go to the lowest class id.
Work is chunked over queries and, for large banks, over the bank (a running top-k is kept), so memory is
O(chunk_size * (bank_chunk + k)) instead of O(queries * bank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _topk_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk: int):
    """Top-k cosine similarities and bank indices of each (already normalised) query: [Q, k] each."""
    best_sim = best_idx = None
    for start in range(0, bank.shape[0], bank_chunk):
        sim = queries @ bank[start:start + bank_chunk].T
        kk = min(k, sim.shape[1])
        s, i = sim.topk(kk, dim=1)
        i = i + start
        if best_sim is None:
            best_sim, best_idx = s, i
        else:
            s, i = torch.cat([best_sim, s], 1), torch.cat([best_idx, i], 1)
            s, j = s.topk(min(k, s.shape[1]), dim=1)
            best_sim, best_idx = s, i.gather(1, j)
    return best_sim, best_idx


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 16384,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Predicted labels Long[Q] of `test_feats` [Q, D] from the bank (`train_feats` [N, D], `train_labels` [N]).

    Features are L2-normalised here (in float32, on the bank's device). `k` is capped at N.
    `chunk_size` queries and `bank_chunk_size` bank rows are compared at a time; results do not depend
    on either.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"need [N, D] and [Q, D] features, got {list(train_feats.shape)} and {list(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"need one label per bank feature, got {list(train_labels.shape)} for {train_feats.shape[0]}")
    if train_feats.shape[0] == 0:
        raise ValueError("empty feature bank")
    if k < 1 or temperature <= 0 or chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError("k, temperature, chunk_size and bank_chunk_size must be positive")
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(device)
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[start:start + chunk_size].to(device).float(), dim=1)
        sim, idx = _topk_neighbours(q, bank, k, bank_chunk_size)
        votes = torch.zeros(q.shape[0], c, device=device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(preds)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 16384,
) -> float:
    """Top-1 accuracy in [0, 1] of `knn_classify` against `test_labels`."""
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()) if test_labels.numel() else 0)) + 1
    pred = knn_classify(train_feats, train_labels, test_feats, k, temperature, chunk_size, bank_chunk_size, num_classes)
    if test_labels.numel() == 0:
        raise ValueError("no test labels")
    return float((pred.cpu() == test_labels.long().cpu()).float().mean())
