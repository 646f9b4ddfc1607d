"""Few-shot classification on frozen features: k images per class, several seeds, mean and std.

The k-shot training set is drawn from the training features with each seed; features are standardised with
the statistics of the whole (unlabelled) training set and L2-normalised; a logistic regression (scikit-learn)
or a nearest class centroid (cosine) is fitted on the k-shot set and scored on the test set.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def sample_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of `shots` random samples of every class present in `labels` (fewer if a class is smaller)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:shots]])
    return torch.cat(picks)


def _fit_predict(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, classifier: str) -> torch.Tensor:
    x, q = F.normalize(x, dim=1), F.normalize(q, dim=1)
    if classifier == "centroid":
        classes = torch.unique(y)
        centroids = F.normalize(torch.stack([x[y == c].mean(0) for c in classes]), dim=1)
        return classes[(q @ centroids.T).argmax(1)]
    if classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=10.0, max_iter=1000)
        clf.fit(x.numpy(), y.numpy())
        return torch.as_tensor(clf.predict(q.numpy()))
    raise ValueError(f"unknown few-shot classifier {classifier!r}; choose logreg or centroid")


def few_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             shots=(1, 5, 10), seeds=(0, 1, 2, 3, 4), classifier: str = "logreg") -> dict:
    """{"results": [{"shots", "mean", "std", "accs"}...], "classifier", "seeds", "seconds"}: test accuracy per seed."""
    start = time.perf_counter()
    # standardise with the statistics of all training features (unlabelled, so no label leaks): MIM features
    # share a large common direction that would otherwise dominate the cosine geometry
    mu, sd = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    train_x, test_x = (train_x.float() - mu) / sd, (test_x.float() - mu) / sd
    results = []
    for k in shots:
        accs = []
        for seed in seeds:
            idx = sample_shots(train_y, int(k), int(seed))
            pred = _fit_predict(train_x[idx], train_y[idx], test_x, classifier)
            accs.append(float((pred == test_y.long()).float().mean()))
        results.append({"shots": int(k), "mean": statistics.fmean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accs": accs})
    return {"results": results, "classifier": classifier, "seeds": [int(s) for s in seeds],
            "seconds": time.perf_counter() - start}
