"""Overrides that point a method's outside references (frozen teachers, a tokenizer run, a class count) at the
test fixtures, for tests that build every method in the METHODS table."""

from __future__ import annotations


def external_overrides(name: str, request) -> list[str]:
    """`method.<teacher field>.source=<teacher_checkpoint>` for every TeacherConfig field, `method.tokenizer=
    <vqkd_run>` and `method.num_classes=10` where the method has them (fixtures from tests/conftest.py)."""
    from mimkit.config import method_config_class
    from mimkit.targets.teacher import teacher_fields

    cls = method_config_class(name)
    out = [f"method.{f}.source={request.getfixturevalue('teacher_checkpoint')}" for f in teacher_fields(cls)]
    if "tokenizer" in cls.model_fields:
        out.append(f"method.tokenizer={request.getfixturevalue('vqkd_run')}")
    if "num_classes" in cls.model_fields:
        out.append("method.num_classes=10")
    return out
