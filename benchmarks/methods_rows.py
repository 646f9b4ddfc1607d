"""The rows of the methods benchmark by name: the random-init floors, frozen-teacher rows
(`teacher`, `teacher:<recipe>`) and variants (`method[key=value,...]`)."""

from __future__ import annotations

from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TEACHER = "teacher"  # the MAE recipe at --teacher-budget-s: the frozen teacher of the distillation rows
TEACHER_OF = "teacher:"  # "teacher:ibot": the ibot recipe at --teacher-budget-s (a teacher for --teacher-for)
RANDOM = "random init"
RANDOM_MEAN = "random init (mean pool)"
FLOORS = (RANDOM, RANDOM_MEAN)


def recipe_of(row_name: str) -> str:
    """The recipe a row trains: "teacher" is MAE's, "teacher:ibot" ibot's, any other row its own."""
    if row_name == TEACHER:
        return "mae"
    return row_name[len(TEACHER_OF):] if row_name.startswith(TEACHER_OF) else row_name


def is_teacher_row(name: str) -> bool:
    return name == TEACHER or name.startswith(TEACHER_OF)


def split_variant(name: str) -> tuple[str, list[str]]:
    """"ibot[mim_weight=0]" -> ("ibot", ["method.mim_weight=0"]): a row for a method's recipe with method
    overrides (several separated by ";"), so an ablation or variant gets its own row beside the method."""
    if "[" not in name:
        return name, []
    if not name.endswith("]"):
        raise ValueError(f"bad method variant {name!r}; write name[key=value;key=value]")
    base, inner = name[:-1].split("[", 1)
    return base, [f"method.{kv.strip()}" for kv in inner.split(";") if kv.strip()]


def split_top(spec: str) -> list[str]:
    """Split a --methods list at commas outside brackets (a variant may hold a comma: stop[sigma=0.5])."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def resolve_methods(spec: str) -> list[str]:
    from mimkit.methods import METHODS

    names = list(METHODS) if spec == "all" else [s.strip() for s in split_top(spec) if s.strip()]
    # MAE first: the claims and the figure compare with it
    return (["mae"] if "mae" in names else []) + [n for n in names if n != "mae"]
