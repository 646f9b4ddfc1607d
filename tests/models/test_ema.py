import math

import pytest
import torch
import torch.nn as nn

from mimkit.engine.optim import param_groups
from mimkit.models.ema import EMATeacher, cosine_momentum, ramp_momentum


def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


class _Holder(nn.Module):
    """A method-like module: the student parts plus their teacher."""

    def __init__(self):
        super().__init__()
        self.net = _student()
        self.teacher = EMATeacher(self.net)


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
        for b in module.buffers():
            if b.is_floating_point():
                b.add_(1.0)


def test_teacher_is_frozen_and_gets_no_gradient_nor_optimizer_slot():
    h = _Holder()
    assert all(not p.requires_grad for p in h.teacher.parameters())
    x = torch.randn(5, 4)
    loss = h.net(x).sum() + h.teacher(x).sum()
    loss.backward()
    assert all(p.grad is None for p in h.teacher.parameters())
    assert all(p.grad is not None for p in h.net.parameters())
    in_groups = {id(p) for g in param_groups(h, 0.05) for p in g["params"]}
    assert in_groups == {id(p) for p in h.net.parameters()}
    assert not in_groups & {id(p) for p in h.teacher.parameters()}


def test_update_endpoints_and_formula():
    h = _Holder()
    before = {k: v.clone() for k, v in h.teacher.state_dict().items()}
    _perturb(h.net)
    h.teacher.update(h.net, momentum=1.0)  # keep the parameters (buffers are copied whatever the momentum)
    for (name, p), (_, q) in zip(h.teacher.module.named_parameters(), h.net.named_parameters()):
        assert torch.equal(p, before["module." + name]) and not torch.equal(p, q)
    for b, c in zip(h.teacher.module.buffers(), h.net.buffers()):
        assert torch.equal(b, c)
    old = [p.clone() for p in h.teacher.module.parameters()]
    h.teacher.update(h.net, momentum=0.9)
    for p, o, s in zip(h.teacher.module.parameters(), old, h.net.parameters()):
        torch.testing.assert_close(p, 0.9 * o + 0.1 * s)
    h.teacher.update(h.net, momentum=0.0)  # copy exactly
    for p, s in zip(h.teacher.module.parameters(), h.net.parameters()):
        assert torch.equal(p, s)
    with pytest.raises(ValueError):
        h.teacher.update(h.net, momentum=1.5)


def test_mapping_of_parts_and_structure_check():
    enc, head = nn.Linear(3, 3), nn.Linear(3, 2)
    t = EMATeacher({"encoder": enc, "head": head})
    assert torch.equal(t.module["head"].weight, head.weight) and t.module["head"].weight is not head.weight
    with torch.no_grad():
        enc.weight.zero_()
    t.update({"encoder": enc, "head": head}, 0.0)
    assert torch.equal(t.module["encoder"].weight, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="differ"):
        t.update({"encoder": enc}, 0.5)


def test_teacher_stays_in_eval_mode_and_round_trips_through_state_dict():
    h = _Holder()
    h.train()
    assert h.net.training and not h.teacher.module.training and not h.teacher.module[2].training
    x = torch.randn(6, 4)
    torch.testing.assert_close(h.teacher(x), h.teacher(x))  # no dropout, running BN statistics
    _perturb(h.net)
    h.teacher.update(h.net, 0.7)
    fresh = _Holder()
    fresh.load_state_dict(h.state_dict())
    assert any(k.startswith("teacher.module.") for k in h.state_dict())
    for a, b in zip(fresh.teacher.state_dict().values(), h.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_schedules_endpoints_and_monotone():
    assert cosine_momentum(0.0, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(1.0, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(0.5, 0.99, 1.0) == pytest.approx(0.995)
    vals = [cosine_momentum(i / 20, 0.9) for i in range(21)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    # HPM: 0.999 -> 0.9999 over the first 100 of 800 epochs, then constant
    assert ramp_momentum(0.0, 0.999, 0.9999, 0.125) == pytest.approx(0.999)
    assert ramp_momentum(0.0625, 0.999, 0.9999, 0.125) == pytest.approx(0.99945)
    assert ramp_momentum(0.125, 0.999, 0.9999, 0.125) == pytest.approx(0.9999)
    assert ramp_momentum(0.9, 0.999, 0.9999, 0.125) == pytest.approx(0.9999)
    assert ramp_momentum(0.3, 0.9, 0.99, 0.0) == 0.99
    assert math.isclose(ramp_momentum(2.0, 0.9, 0.99, 0.5), 0.99)


def test_schedules_follow_their_definitions():
    import math

    import pytest
    from pydantic import ValidationError

    from mimkit.models.ema import EMASchedule

    lin = EMASchedule(kind="linear", start=0.996, end=1.0)
    assert lin(0.0) == pytest.approx(0.996) and lin(0.5) == pytest.approx(0.998) and lin(1.0) == pytest.approx(1.0)
    cos = EMASchedule(kind="cosine", start=0.9, end=1.0)
    assert cos(0.5) == pytest.approx(0.95) and cos(0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    staged = EMASchedule(kind="staged", start=0.99, stages=[(0.5, 0.999), (0.9, 1.0)])
    assert [staged(p) for p in (0.0, 0.49, 0.5, 0.95)] == [0.99, 0.99, 0.999, 1.0]
    assert EMASchedule(kind="constant", start=0.0)(0.7) == 0.0
    ramp = EMASchedule(kind="ramp", start=0.99, end=0.999, ramp=0.5)
    assert ramp(0.25) == pytest.approx(0.9945) and ramp(0.8) == pytest.approx(0.999)
    with pytest.raises(ValidationError, match="sorted"):
        EMASchedule(kind="staged", stages=[(0.9, 1.0), (0.5, 0.99)])
    with pytest.raises(ValidationError):
        EMASchedule(kind="cosine", start=1.5)


def test_copy_every_step_schedule_makes_the_teacher_the_student():
    import torch.nn as nn

    from mimkit.models.ema import EMASchedule, EMATeacher

    student = nn.Linear(3, 2)
    teacher = EMATeacher(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student, EMASchedule(kind="constant", start=0.0)(0.3))
    assert torch.equal(teacher.module.weight, student.weight)
