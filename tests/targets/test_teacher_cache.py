import torch

from mimkit.targets.teacher_cache import TeacherCache


def _teacher(calls):
    def compute(x):
        calls.append(x.shape[0])
        return [x.flatten(1)[:, :5] * 2, x.mean((1, 2, 3)).unsqueeze(1)]
    return compute


def test_second_pass_reads_from_disk_and_changed_images_are_recomputed(tmp_path):
    calls = []
    cache = TeacherCache(tmp_path)
    x = torch.randn(4, 1, 6, 6)
    seeds = torch.tensor([11, 12, 13, 14])
    a = cache.get(x, seeds, _teacher(calls))
    b = cache.get(x, seeds, _teacher(calls))
    assert calls == [4] and cache.hits == 1 and all(torch.equal(p, q) for p, q in zip(a, b))
    # a reopened cache (a second run) sees the same parts; a permuted batch of cached seeds is a hit too
    again = TeacherCache(tmp_path)
    perm = torch.tensor([2, 0, 3, 1])
    c = again.get(x[perm], seeds[perm], _teacher(calls))
    assert calls == [4] and torch.equal(c[0], a[0][perm])
    # the same seed with another image (other data or augmentation): recomputed, never served stale
    y = x.clone()
    y[0] += 1
    d = again.get(y, seeds, _teacher(calls))
    assert calls == [4, 4] and torch.equal(d[0], _teacher([])(y)[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_writing_stops_at_the_size_limit(tmp_path):
    calls = []
    cache = TeacherCache(tmp_path, max_bytes=1)
    x = torch.randn(2, 1, 4, 4)
    cache.get(x, torch.tensor([1, 2]), _teacher(calls))   # the first part is written, then the limit binds
    cache.get(x + 1, torch.tensor([3, 4]), _teacher(calls))
    cache.get(x + 1, torch.tensor([3, 4]), _teacher(calls))
    assert len(list(tmp_path.glob("part-*"))) == 1 and calls == [2, 2, 2]
