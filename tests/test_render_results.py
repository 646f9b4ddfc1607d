"""benchmarks/render_results.py: each recipe's table and targets from evidence JSON alone, decided per seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _evidence(seed, pretrained, random_init, raw, knn=(0.80, 0.72, 0.85)):
    def cells(lin, k):
        return {"linear@1": {"value": lin}, "knn@1": {"value": k}}

    rows = {"pretrained": cells(pretrained, knn[0]), "random_init": cells(random_init, knn[1]),
            "raw_pixels": cells(raw, knn[2])}
    return {"seed": seed, "table": {"cells": ["knn@1", "linear@1"], "rows": rows}, "pretrain_wall_s": 600.0,
            "eval_s": 300.0, "machine": {"host": "h", "cpus": 2, "threads": 2, "load_avg_end": [2.0, 2.0, 2.0]}}


def test_targets_with_a_margin_and_an_absolute_floor(rr):
    runs = [_evidence(0, 0.880, 0.80, 0.843), _evidence(1, 0.885, 0.81, 0.843), _evidence(2, 0.890, 0.79, 0.843)]
    # >= 87%: the per-seed excesses 1.0, 1.5, 2.0 points; t(0.975, 2) = 4.303 -> 1.5 +- 1.24
    d = rr.decide(runs, "pretrained", "linear@1", None, "linear@1", 0.87)
    assert d["status"] == "held" and d["mean"] == pytest.approx(0.015) and d["low"] == pytest.approx(0.00258, abs=1e-4)
    assert rr.decide(runs, "pretrained", "linear@1", None, "linear@1", 0.89)["status"] == "inconclusive"  # -0.5 +- 1.24
    assert rr.decide(runs, "pretrained", "linear@1", None, "linear@1", 0.90)["status"] == "failed"  # -1.5 +- 1.24
    # >= raw pixels + 2: excesses 1.7, 2.2, 2.7 points
    assert rr.decide(runs, "pretrained", "linear@1", "raw_pixels", "linear@1", 0.02)["status"] == "held"
    # kNN 80 against raw pixels' 85 on every seed: the claim "kNN >= raw pixels" fails
    assert rr.decide(runs, "pretrained", "knn@1", "raw_pixels", "knn@1", 0.0)["status"] == "failed"


def test_a_recipe_renders_from_its_json(rr, tmp_path):
    runs = [_evidence(s, 0.88 + s / 200, 0.80, 0.843) for s in range(3)]
    lines = rr.render_recipe("long", runs)
    table = [ln for ln in lines if ln.startswith("| pretrained")]
    assert table == ["| pretrained | 80.00 +- 0.00 (3) | 88.50 +- 0.50 (3) |"]
    parts = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith(("| linear", "| kNN"))]
    verdicts = {p[0]: p[-1] for p in parts}
    assert verdicts["linear probe >= 87%"] == "held" and verdicts["kNN >= raw pixels' kNN"] == "failed"
    # targets on cells the recipe did not measure (fine-tuning here) are left out, not shown as n/a
    assert not any("fine-tune" in ln for ln in lines)
