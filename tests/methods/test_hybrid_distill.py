"""Hybrid Distillation (card S5): relations from a MIM teacher, features from another, progressive token dropping."""

import pytest
import torch

from method_helpers import falls, fashion_mnist, small_method, train_metrics

from mimkit.methods.hybrid_distill import kept_relations, relation_loss


def _hybrid(teacher_checkpoint, *overrides, depth=4):
    torch.manual_seed(0)
    return small_method("hybrid_distill", (28, 28), 1, "data.mean=[0.286]", "data.std=[0.353]",
                        f"method.mim_teacher.source={teacher_checkpoint}",
                        f"method.feature_teacher.source={teacher_checkpoint}", *overrides, depth=depth)


def _probs(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relation_loss_is_zero_only_when_the_attention_matches(kind):
    teacher = _probs((2, 3, 10, 10))
    ids = torch.tensor([[0, 2, 3, 7], [0, 1, 5, 9]])
    kept = kept_relations(teacher, ids)
    assert torch.allclose(kept.sum(-1), torch.ones(2, 3, 4))
    # renormalised rows over the kept tokens, by hand for one entry
    row = teacher[1, 2, 5, [0, 1, 5, 9]]
    assert torch.allclose(kept[1, 2, 2], row / row.sum())
    assert float(relation_loss(kept.log(), kept, kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_loss(torch.zeros(2, 3, 4, 4), kept, kind)) > 1e-3
    # head counts that differ: both sides averaged over heads
    same = kept[:, :1].expand(-1, 3, -1, -1)
    assert float(relation_loss(same[:, :2].log(), same, kind)) == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_vanishes_for_a_student_that_is_the_mim_teacher(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, "method.max_drop=0.5").eval()
    method.encoder.load_state_dict(method.mim_teacher.encoder.model.state_dict())
    batch = {"image": fashion_mnist(8), "seed": torch.arange(8)}
    method.progress = 0.0                          # nothing dropped yet: the student's attention IS the teacher's
    out = method(batch)
    assert float(out["kept"]) == 49 and float(out["relation_loss"]) < 1e-5
    method.progress = 1.0                          # half the patches gone: the student's maps differ now
    assert float(method(batch)["relation_loss"]) > 1e-4


def test_drop_ratio_follows_its_schedule(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, "method.max_drop=0.6", depth=2)
    method.begin_step(0, 10)
    assert method.drop_ratio() == 0.0 and method.num_kept() == 49
    method.begin_step(5, 10)
    assert method.drop_ratio() == pytest.approx(0.3) and method.num_kept() == 49 - 15
    method.progress = 1.0
    assert method.drop_ratio() == pytest.approx(0.6) and method.num_kept() == 49 - 29
    out = method({"image": fashion_mnist(4), "seed": torch.arange(4)})
    assert float(out["kept"]) == 20 and float(out["drop_ratio"]) == pytest.approx(29 / 49)


def test_dropped_patches_are_the_lowest_attention_ones(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, "method.max_drop=0.5", depth=2)
    method.progress = 1.0
    images = fashion_mnist(6)
    mask = method.make_mask({"image": images, "seed": torch.arange(6)})
    _, (attn,) = method.mim_teacher.forward_with_attention(images, [-1])
    scores = method.mim_teacher.cls_attention_on_student_grid(attn)
    assert mask.masked.sum(1).eq(25).all() and mask.ids_keep.shape == (6, 24)
    for b in range(6):
        assert scores[b][mask.masked[b]].max() <= scores[b][~mask.masked[b]].min()
        assert torch.equal(mask.ids_keep[b], (~mask.masked[b]).nonzero().view(-1))


def test_both_teachers_are_frozen_and_not_saved(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, depth=2)
    assert not any("teacher" in k for k in method.state_dict())
    teachers = [*method.mim_teacher.encoder.parameters(), *method.feature_teacher.encoder.parameters()]
    assert teachers and not any(p.requires_grad for p in teachers)
    assert {id(p) for p in teachers}.isdisjoint(id(p) for p in method.parameters())
    method.progress = 0.5
    method({"image": fashion_mnist(4), "seed": torch.arange(4)})["loss"].backward()
    assert all(p.grad is None for p in teachers)
    assert method.proj.weight.grad.abs().sum() > 0


def test_relation_gradient_reaches_the_students_attention(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, "method.beta=0", depth=2)   # the relation loss alone
    method({"image": fashion_mnist(4), "seed": torch.arange(4)})["loss"].backward()
    last = method.encoder.blocks[-1]                                 # paired with the teacher's last block
    assert last.attn.qkv.weight.grad.abs().sum() > 0
    assert last.mlp.fc2.weight.grad.abs().sum() == 0 and method.proj.weight.grad.abs().sum() == 0


def test_loss_falls_on_fashion_mnist(teacher_checkpoint):
    method = _hybrid(teacher_checkpoint, depth=2)
    rows = train_metrics(method, fashion_mnist(256), steps=20, lr=1e-3, batch_size=16)
    assert falls([r["loss"] for r in rows])
    assert falls([r["relation_loss"] for r in rows]) and falls([r["feature_loss"] for r in rows])
    kept = [r["kept"] for r in rows]
    assert kept[0] == 49 and kept[-1] < 49 and kept == sorted(kept, reverse=True)
    assert all(0.0 <= r["pred_sim"] <= 1.0 and r["attn_entropy"] > 0 for r in rows)
