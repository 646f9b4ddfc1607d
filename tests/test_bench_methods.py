"""benchmarks/methods.py: budget-to-steps, card-claim checks, table/report rendering, and one tiny real run."""

from __future__ import annotations

import importlib.util
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ budget


def test_steps_for_budget(bench):
    assert bench.steps_for_budget(120, 0.5) == 240
    assert bench.steps_for_budget(10, 0.3) == 33                 # floor: never over the budget
    assert bench.steps_for_budget(1, 2.0, min_steps=5) == 5      # a slow method still trains a few steps
    assert bench.steps_for_budget(100, 0.01, max_steps=500) == 500
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            bench.steps_for_budget(10, bad)


def test_exit_status_only_fails_on_mae(bench):
    assert bench.exit_status({"mae": {"steps": 3}, "hpm": {"error": "ImportError: x"}}) == 0
    assert bench.exit_status({"mae": {"error": "RuntimeError: y"}, "hpm": {"steps": 3}}) == 1
    assert bench.exit_status({"simmim": {"error": "RuntimeError: y"}}) == 0


# ------------------------------------------------------------------------------------------------ claims


def _hist(key, values):
    return [{"step": i + 1, "loss": 1.0, key: v} for i, v in enumerate(values)]


def test_hpm_claim(bench):
    rising = _hist("rank_acc", [0.50, 0.52, 0.55, 0.58, 0.60, 0.62, 0.63, 0.65])
    status, evidence = bench.check_hpm(rising)
    assert status == "held" and "0.510" in evidence and "0.640" in evidence
    assert bench.check_hpm(_hist("rank_acc", [0.30, 0.35, 0.40, 0.45]))[0] == "did not hold"  # rises, below 0.5
    assert bench.check_hpm(_hist("rank_acc", [0.70, 0.68, 0.62, 0.60]))[0] == "did not hold"  # above 0.5, falls
    assert bench.check_hpm(_hist("other", [0.9, 0.9]))[0] == "not logged"
    assert bench.check_hpm([])[0] == "not logged"


def test_mff_claim(bench):
    hist = _hist("fuse_shallow", [0.75, 0.76, 0.78, 0.80])
    hist[-1].update({"fuse_w0": 0.3, "fuse_w2": 0.5, "fuse_w3": 0.2})
    status, evidence = bench.check_mff(hist)
    assert status == "held"
    assert "0.7500" in evidence and "0.8000" in evidence and "0:0.300" in evidence and "3:0.200" in evidence
    assert bench.check_mff(_hist("fuse_shallow", [0.75, 0.74, 0.70]))[0] == "did not hold"
    assert bench.check_mff(_hist("rank_acc", [0.5]))[0] == "not logged"


def test_dmjd_claim_compares_with_mae(bench):
    rows = {"mae": {"linear": 0.70, "eval_test": 2000}}
    assert bench.check_dmjd([], {"linear": 0.76, "eval_test": 2000}, rows)[0] == "held"
    assert bench.check_dmjd([], {"linear": 0.64, "eval_test": 2000}, rows)[0] == "did not hold"
    assert bench.check_dmjd([], {"linear": 0.705, "eval_test": 2000}, rows)[0] == "inconclusive"
    assert bench.check_dmjd([], {"linear": 0.8}, {})[0] == "n/a"


def test_check_claim_dispatch(bench):
    assert bench.check_claim("localmim", [], {}, {})["status"] == "n/a"
    c = bench.check_claim("hpm", _hist("rank_acc", [0.6, 0.7]), {}, {})
    assert c["status"] == "held" and c["claim"] and c["test"]


# ------------------------------------------------------------------------------------------------ curves


def test_normalised_curve(bench):
    hist = [{"loss": v} for v in (2.0, 1.5, 1.0, 1.0)]
    x, y = bench.normalised_curve(hist)
    assert x[-1] == 1.0 and len(x) == len(y) == 4
    assert y == [1.0, 0.75, 0.5, 0.5]              # 4 steps: no smoothing window
    x, y = bench.normalised_curve([{"loss": float(v)} for v in range(100, 0, -1)])
    assert y[0] < 1.0 and all(a >= b for a, b in zip(y, y[1:]))  # smoothed, still falling
    assert bench.normalised_curve([]) == ([], [])


def _results(bench, smoke=False):
    hist = [{"step": i + 1, "loss": 1.0 / (i + 1), "rank_acc": 0.5 + 0.01 * i} for i in range(40)]
    rows = {
        "mae": {"steps": 40, "images_seen": 5120, "train_s": 100.0, "wall_s": 130.0, "images_per_s": 51.2,
                "loss_first": 1.0, "loss_final": 0.03, "val_loss": 0.5, "knn": 0.70, "linear": 0.72,
                "attentive": 0.65, "eval_test": 2000, "history": hist, "stage": "done",
                "claim": bench.check_claim("mae", hist, {}, {})},
        "hpm": {"steps": 20, "images_seen": 2560, "train_s": 110.0, "wall_s": 140.0, "images_per_s": 23.3,
                "loss_first": 1.0, "loss_final": 0.1, "val_loss": 0.4, "knn": 0.60, "linear": 0.75,
                "attentive": 0.66, "eval_test": 2000, "history": hist, "stage": "done",
                "claim": bench.check_claim("hpm", hist, {}, {})},
        "mff": {"method": "mff", "stage": "config", "error": "ImportError: no module | named mff",
                "claim": bench.check_claim("mff", [], {}, {})},
        bench.RANDOM: {"knn": 0.65, "linear": 0.60, "attentive": 0.30, "stage": "done",
                       "claim": {"status": "n/a", "claim": None, "evidence": "untrained floor"}},
    }
    setup = {"command": ".venv/bin/python benchmarks/methods.py --budget-s 100", "machine": "x86_64", "cpu_count": 2,
             "threads": 2, "torch": "2.x", "python": "3.11", "device": "cpu", "started": "now", "budget_s": 100.0,
             "batch_size": 128, "seed": 0, "common_overrides": ["optim.batch_size=128"], "val_fraction": 0.05,
             "eval_train": 5000, "eval_test": 2000, "attentive_train": 2000, "knn_k": 20, "knn_temperature": 0.07,
             "linear_epochs": 30, "probe_val_fraction": 0.1, "attentive_epochs": 10, "attentive_heads": 8,
             "calibration_steps": 4, "calibration_warmup": 2, "smoke": smoke}
    return {"setup": setup, "order": ["mae", "hpm", "mff", bench.RANDOM], "rows": rows, "seconds": 600.0,
            "figure": "figures/methods_loss.svg"}


def test_render_table(bench):
    table = bench.render_table(_results(bench))
    lines = table.splitlines()
    assert lines[0].startswith("| method | steps | images seen |") and "attentive" in lines[0]
    assert len(lines) == 2 + 4 and all(line.count("|") - line.count("\\|") == 13 for line in lines)
    mae = next(line for line in lines if line.startswith("| mae |"))
    assert "| 40 | 5,120 |" in mae and "| 70.00 | 72.00 | 65.00 |" in mae
    hpm = next(line for line in lines if line.startswith("| hpm |"))
    assert "**held**" in hpm and "rank_acc mean" in hpm
    mff = next(line for line in lines if line.startswith("| mff |"))
    assert "**failed** (config)" in mff and "no module \\| named mff" in mff   # the pipe is escaped
    rnd = next(line for line in lines if line.startswith(f"| {bench.RANDOM} |"))
    assert "| 65.00 | 60.00 | 30.00 |" in rnd


def test_render_markdown_and_notes(bench):
    res = _results(bench)
    md = bench.render_markdown(res)
    assert md.startswith("# ") and "Smoke run" not in md
    assert res["setup"]["command"] in md and "not comparable across methods" in md
    assert "![normalised training loss per method](figures/methods_loss.svg)" in md
    notes = bench.reading_notes(res)
    assert any(n.startswith("kNN: best mae (70.00%)") and "1 of 2 score above random init" in n
               and "not above: hpm" in n for n in notes)
    assert any(n.startswith("linear probe: best hpm (75.00%)") and "ranks 2 of 2" in n for n in notes)
    assert any("Failed: mff (config)" in n for n in notes)
    assert any("hpm card claim" in n and "held" in n for n in notes)
    assert "Smoke run" in bench.render_markdown(_results(bench, smoke=True))


def test_loss_figure_is_svg(bench):
    res = _results(bench)
    svg = bench.loss_figure(res["rows"], res["order"])
    root = ET.fromstring(svg)
    panels = [c for c in root if c.tag.endswith("svg")]
    assert len(panels) == 2                        # mae and hpm; the failed and untrained rows have no curve
    assert "hpm: 20 steps" in svg and "stroke-dasharray" in svg  # MAE's dashed reference in hpm's panel
    assert bench.loss_figure({}, []) == ""


# ------------------------------------------------------------------------------------------------ end to end


def test_tiny_end_to_end(bench, tmp_path):
    out, js = tmp_path / "methods.md", tmp_path / "methods.json"
    code = bench.main([
        "--methods", "mae,no_such_method", "--budget-s", "1", "--threads", "1", "--batch-size", "16",
        "--eval-train", "120", "--eval-test", "60", "--attentive-train", "60", "--calibration-steps", "1",
        "--calibration-warmup", "1", "--min-steps", "3",
        "--set", "model.depth=1", "--set", "model.decoder_depth=1", "--set", "data.limit=128",
        "--set", "data.val_fraction=0.002", "--set", "data.stats_samples=64",
        "--out", str(out), "--json", str(js), "--work-dir", str(tmp_path / "runs"),
    ])
    assert code == 0                               # the unknown method fails alone
    res = json.loads(js.read_text())
    mae = res["rows"]["mae"]
    assert mae.get("error") is None, mae.get("traceback")
    assert mae["steps"] == mae["max_steps"] >= 3 and len(mae["history"]) == mae["steps"]
    assert mae["images_seen"] == 16 * mae["steps"] and mae["images_per_s"] > 0
    for key in ("knn", "linear", "attentive"):
        assert 0.0 <= mae[key] <= 1.0 and 0.0 <= res["rows"]["random init"][key] <= 1.0
    assert math.isfinite(mae["val_loss"]) and math.isfinite(mae["loss_final"])
    assert 0.0 <= mae["attn_nmi"] <= 1.0 and mae["attn_distance"] > 0  # the last block's attention, read
    assert "FileNotFoundError" in res["rows"]["no_such_method"]["error"]
    md = out.read_text()
    assert "Smoke run" in md and "| mae (mean pool) | " in md and "| no_such_method |" in md
    assert (tmp_path / "figures" / "methods_loss.svg").is_file()
    assert not any((tmp_path / "runs").iterdir())   # finished runs are removed unless --keep-runs

    # a variant row merged into the same table: the earlier rows and the random-init row are kept
    js2 = tmp_path / "merged.json"
    code = bench.main([
        "--methods", "mae[mask_ratio=0.5]", "--budget-s", "1", "--threads", "1", "--batch-size", "16",
        "--eval-train", "120", "--eval-test", "60", "--attentive-train", "60", "--calibration-steps", "1",
        "--calibration-warmup", "1", "--min-steps", "3",
        "--set", "model.depth=1", "--set", "model.decoder_depth=1", "--set", "data.limit=128",
        "--set", "data.val_fraction=0.002", "--set", "data.stats_samples=64",
        "--out", str(out), "--json", str(js2), "--merge", str(js), "--work-dir", str(tmp_path / "runs"),
    ])
    merged = json.loads(js2.read_text())
    assert merged["order"] == ["mae", "no_such_method", "mae[mask_ratio=0.5]", "random init",
                               "random init (mean pool)"]  # the demo recipe probes the patch mean
    assert merged["rows"]["mae"]["knn"] == mae["knn"]
    assert merged["rows"]["random init"] == res["rows"]["random init"]
    variant = merged["rows"]["mae[mask_ratio=0.5]"]
    assert variant.get("error") is None and variant["overrides"] == ["method.mask_ratio=0.5"]
    assert len(merged["setup"]["commands"]) == 2 and "| mae[mask_ratio=0.5] (mean pool) |" in out.read_text()
    with pytest.raises(SystemExit, match="budget_s"):
        bench.main(["--methods", "mae", "--budget-s", "2", "--threads", "1", "--batch-size", "16",
                    "--eval-train", "120", "--eval-test", "60", "--attentive-train", "60",
                    "--calibration-steps", "1", "--calibration-warmup", "1", "--min-steps", "3",
                    "--set", "model.depth=1", "--set", "model.decoder_depth=1", "--set", "data.limit=128",
                    "--set", "data.val_fraction=0.002", "--set", "data.stats_samples=64",
                    "--out", str(out), "--merge", str(js2), "--work-dir", str(tmp_path / "runs")])


def test_split_variant(bench):
    assert bench.split_variant("ibot") == ("ibot", [])
    assert bench.split_variant("attmask[variant=low; mask_prob=1]") == (
        "attmask", ["method.variant=low", "method.mask_prob=1"])
    with pytest.raises(ValueError):
        bench.split_variant("ibot[x=1")


def test_claim_of_a_failed_method_is_not_run(bench):
    c = bench.check_claim("hpm", [], {"error": "ImportError: x", "stage": "config"}, {})
    assert c["status"] == "not run" and "config" in c["evidence"]


def test_variant_claims(bench):
    rows = {"attmask": {"knn": 0.70, "eval_test": 2000}, "attmask[variant=hint]": {"knn": 0.71},
            "attmask[variant=low]": {"knn": 0.60}}
    assert bench.check_claim("attmask", [{"loss": 1}], rows["attmask"], rows)["status"] == "held"
    rows["attmask[variant=low]"]["knn"] = 0.695
    assert bench.check_claim("attmask", [{"loss": 1}], rows["attmask"], rows)["status"] == "inconclusive"
    rows["attmask[variant=low]"]["knn"] = 0.71     # a tie with Hint: within the noise
    assert bench.check_claim("attmask", [{"loss": 1}], rows["attmask"], rows)["status"] == "inconclusive"
    rows["attmask[variant=low]"]["knn"] = 0.75
    assert bench.check_claim("attmask", [{"loss": 1}], rows["attmask"], rows)["status"] == "did not hold"
    cae = {"method": "cae", "linear": 0.60, "eval_test": 2000}
    assert bench.check_claim("cae", [{"loss": 1}], cae, {"cae[align_weight=0]": {"linear": 0.70}})["status"] == "held"
    assert bench.check_claim("stop", [{"loss": 1}], {"linear": 0.60, "eval_test": 2000},
                             {"ijepa": {"linear": 0.70}})["status"] == "did not hold"
    assert bench.check_claim("ibot[mim_weight=0]", [{"loss": 1}], {}, {})["status"] == "n/a"


def test_merge_results_and_split_top(bench):
    setup = {"budget_s": 60, "batch_size": 128, "seed": 0, "eval_train": 5, "eval_test": 5, "attentive_train": 5,
             "device": "cpu", "command": "a"}
    a = {"setup": setup, "order": ["mae", "x", "random init"], "rows": {"mae": {"k": 1}, "x": {"k": 2},
                                                                         "random init": {"k": 0}}}
    b = {"setup": {**setup, "command": "b"}, "order": ["x", "y", "random init"],
         "rows": {"x": {"k": 3}, "y": {"k": 4}, "random init": {"k": 0}}}
    m = bench.merge_results([a, b])
    assert m["order"] == ["mae", "x", "random init", "y"] and m["rows"]["x"] == {"k": 3}
    assert m["setup"]["commands"] == ["a", "b"]
    with pytest.raises(SystemExit, match="budget_s"):
        bench.merge_results([a, {**b, "setup": {**b["setup"], "budget_s": 30}}])
    assert bench.split_top("mae,stop[sigma=0.5;x=1],ijepa") == ["mae", "stop[sigma=0.5;x=1]", "ijepa"]


def test_wave_1c_claims(bench):
    row = lambda **kw: {"eval_test": 2000, **kw}  # noqa: E731
    hist = [{"code_usage": 1.0}] * 20 + [{"code_usage": 0.95}] * 8
    assert bench.check_vqkd(hist)[0] == "held"
    assert bench.check_vqkd([{"code_usage": 1.0}] * 20 + [{"code_usage": 0.5}] * 8)[0] == "did not hold"
    assert bench.check_vqkd([{"code_usage": 1.0}] * 13)[0] == "n/a"   # the window still holds the k-means batch
    assert bench.check_vqkd([{"loss": 1.0}])[0] == "not logged"
    rows = {bench.TEACHER: row(linear=0.80, steps=300), "mae": row(s_per_step=1.0)}
    # within the noise of the teacher and cheaper than MAE: reached
    assert bench.check_maskalign([], row(linear=0.79, s_per_step=0.8, steps=50), rows)[0] == "held"
    assert bench.check_maskalign([], row(linear=0.79, s_per_step=1.3), rows)[0] == "did not hold"   # dearer
    assert bench.check_maskalign([], row(linear=0.70, s_per_step=0.8), rows)[0] == "did not hold"   # below
    assert bench.check_maskalign([], row(linear=0.79, s_per_step=0.8), {})[0] == "n/a"
    both = {"cl_mim[lam=0]": row(linear=0.70), "cl_mim[lam=1]": row(linear=0.60)}
    assert bench.check_cl_mim([], row(linear=0.80), both)[0] == "held"
    assert bench.check_cl_mim([], row(linear=0.65), both)[0] == "did not hold"
    assert bench.check_cl_mim([], row(linear=0.71), both)[0] == "inconclusive"
    assert bench.check_cl_mim([], row(linear=0.71), {})[0] == "n/a"


def test_hybrid_distillation_claim_reads_both_wired_teachers(bench):
    row = lambda **kw: {"eval_test": 2000, **kw}  # noqa: E731
    mim = row(run_dir="/r/mae", linear=0.70, attn_nmi=0.30, attn_distance=9.0)
    cl = row(run_dir="/r/ibot", linear=0.80, attn_nmi=0.05, attn_distance=14.0)
    rows = {bench.TEACHER: mim, "teacher:ibot": cl}
    wiring = ["method.mim_teacher.source=/r/mae", "method.feature_teacher.source=/r/ibot"]
    student = lambda **kw: row(wiring=wiring, **{"attn_nmi": 0.25, "attn_distance": 10.0, **kw})  # noqa: E731
    assert bench.check_hybrid_distill([], student(linear=0.76), rows)[0] == "held"
    assert bench.check_hybrid_distill([], student(linear=0.71), rows)[0] == "inconclusive"
    assert bench.check_hybrid_distill([], student(linear=0.60), rows)[0] == "did not hold"
    # attention like the CL teacher's: the MIM half of the claim fails whatever the probe
    assert bench.check_hybrid_distill([], student(linear=0.76, attn_nmi=0.06), rows)[0] == "did not hold"
    # one teacher in both roles, or a CL teacher that is not more separable: nothing to check
    same = ["method.mim_teacher.source=/r/mae", "method.feature_teacher.source=/r/mae"]
    assert bench.check_hybrid_distill([], row(wiring=same, linear=0.8, attn_nmi=0.2, attn_distance=9.0),
                                      rows)[0] == "n/a"
    weak = {bench.TEACHER: mim, "teacher:ibot": {**cl, "linear": 0.69}}
    assert bench.check_hybrid_distill([], student(linear=0.76), weak)[0] == "n/a"


def test_teacher_for_wires_one_field_to_another_teacher_row(bench):
    from types import SimpleNamespace

    from mimkit.config import load_config

    cfg = load_config(bench.ROOT / "configs" / "hybrid_distill_vit_tiny_fmnist.yaml").method
    rows = {bench.TEACHER: {"run_dir": "/r/mae", "stage": "done"},
            "teacher:ibot": {"run_dir": "/r/ibot", "stage": "done"}}
    args = SimpleNamespace(teacher=None, teacher_for=["feature_teacher=teacher:ibot"])
    assert bench.wiring_overrides(cfg, args, rows) == ["method.mim_teacher.source=/r/mae",
                                                       "method.feature_teacher.source=/r/ibot"]
    assert bench.recipe_of("teacher:ibot") == "ibot" and bench.recipe_of(bench.TEACHER) == "mae"
    assert bench.is_teacher_row("teacher:ibot") and not bench.is_teacher_row("ibot")
    with pytest.raises(ValueError, match="has not run"):
        bench.wiring_overrides(cfg, SimpleNamespace(teacher=None, teacher_for=["feature_teacher=teacher:x"]), rows)
    with pytest.raises(SystemExit, match="FIELD=ROW"):
        bench.teacher_for(SimpleNamespace(teacher_for=["feature_teacher"]))
