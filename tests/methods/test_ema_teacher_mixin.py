import torch
import torch.nn as nn

from mimkit.methods.base import EMATeacherMixin, Method
from mimkit.models.ema import EMASchedule


class Tiny(EMATeacherMixin, Method):
    def __init__(self, schedule):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        self.init_teacher(schedule)

    def student(self):
        return {"encoder": self.encoder, "head": self.head}


def test_end_step_moves_the_teacher_with_the_schedules_momentum_at_that_step():
    m = Tiny(EMASchedule(kind="linear", start=0.5, end=1.0))
    before = {k: v.clone() for k, v in m.teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)
    m.end_step(step=5, total_steps=10)  # progress 0.5: momentum 0.75
    assert m.momentum(0.5) == 0.75
    student = nn.ModuleDict(m.student()).state_dict()
    for k, v in m.teacher.module.state_dict().items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * student[k])
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert "teacher.module.head.weight" in m.state_dict()  # in the checkpoint: a resume continues with it


def test_the_default_student_is_the_encoder_and_any_callable_is_a_schedule():
    class EncoderOnly(EMATeacherMixin, Method):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)
            self.init_teacher(lambda progress: 0.0)  # momentum 0: the teacher copies the student

    m = EncoderOnly()
    with torch.no_grad():
        m.encoder.weight.add_(3.0)
    m.end_step(0, 1)
    assert torch.equal(m.teacher.module.weight, m.encoder.weight)
