"""benchmarks/methods_v2.py: claims decided by the paired rule, resume skipping finished rows, a setup that
cannot change under one name, the table rendered from JSON alone, and one tiny real row."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def v2():
    spec = importlib.util.spec_from_file_location("bench_methods_v2", ROOT / "benchmarks" / "methods_v2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name, seed, linear, knn=0.5, **extra):
    machine = {"host": "h", "cpus": 2, "threads": 2, "load_avg_start": [1.0, 1, 1], "load_avg_end": [2.0, 1, 1]}
    return {"row": name, "seed": seed, "eval": {"linear": linear, "knn": knn, "attentive": 0.4}, "machine": machine,
            "wall_s": 60.0, "started": "2026-12-03 08:00:00", **extra}


def _write(folder: Path, rows: list[dict], setup: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "setup.json").write_text(json.dumps(setup or {"epochs": 1.0}))
    for r in rows:
        (folder / f"{r['row'].replace(' ', '_')}-s{r['seed']}.json").write_text(json.dumps(r))


def test_claims_follow_the_paired_rule(v2):
    rows = {
        "mae": {0: _row("mae", 0, 0.80), 1: _row("mae", 1, 0.81), 2: _row("mae", 2, 0.79)},
        # +5 points on every seed, spread 1 point: the interval lies above 0
        "simmim": {0: _row("simmim", 0, 0.85), 1: _row("simmim", 1, 0.865), 2: _row("simmim", 2, 0.845)},
        # below MAE on every seed: its card's "above MAE" claim fails
        "cae": {0: _row("cae", 0, 0.70), 1: _row("cae", 1, 0.72), 2: _row("cae", 2, 0.69)},
        # one seed up, one down: inconclusive
        "localmim": {0: _row("localmim", 0, 0.83), 1: _row("localmim", 1, 0.78), 2: _row("localmim", 2, 0.80)},
        "random init": {s: _row("random init", s, 0.75) for s in range(3)},
    }
    got = {(c["row"], c["against"], c["claim"]): c for c in v2.claims(rows)}
    card = {row: got[(row, "mae", v2.CLAIMS[row][3])] for row in ("simmim", "cae", "localmim")}
    assert card["simmim"]["status"] == "held" and card["simmim"]["mean"] == pytest.approx(0.0533, abs=1e-3)
    assert card["cae"]["status"] == "failed"
    assert card["localmim"]["status"] == "inconclusive"
    floor = got[("mae", "random init", "linear probe above the untrained encoder")]
    assert floor["status"] == "held" and floor["n"] == 3
    # a card whose claim is "linear above MAE" is not asked twice
    assert ("simmim", "mae", "linear probe above MAE's") not in got
    # two seeds decide nothing
    two = {k: {s: r for s, r in v.items() if s < 2} for k, v in rows.items()}
    assert {c["status"] for c in v2.claims(two)} == {"insufficient seeds"}


def test_the_table_is_rendered_from_the_json_alone(v2, tmp_path):
    folder = tmp_path / "e1"
    _write(folder, [_row("mae", s, v, epochs=1.0, s_per_epoch=100.0 + s) for s, v in enumerate((0.80, 0.81, 0.79))]
           + [_row("random init", s, 0.75) for s in range(3)]
           + [_row("simmim", s, 0.85, epochs=1.0, flops_per_image=2e8) for s in range(2)])
    text = v2.render(folder)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| mae | 1.00 +- 0.00 (3) | 80.00 +- 1.00 (3) |")
    assert "| 101.00 +- 1.00 (3) |" in lines[1]  # s/epoch 100, 101, 102
    assert lines[2].startswith("| simmim |") and "| 0.20 +- 0.00 (2) |" in lines[2]  # GFLOPs per image
    assert lines[3].startswith("| random init | n/a | 75.00 +- 0.00 (3) |")
    assert "insufficient seeds" in text and "load 1.0 -> 2.0" in text
    assert text == v2.render(folder)  # nothing but the files: the same text again


class _Launcher:
    def __init__(self, v2, folder):
        self.v2, self.folder, self.calls = v2, folder, []

    def __call__(self, args, name, row, seed):
        self.calls.append((row, seed))
        self.v2.write_json(self.v2.row_file(self.folder / name, row, seed), _row(row, seed, 0.5))
        return 0


def _args(tmp_path, **kw):
    base = dict(methods="simmim,vqkd,mae", seeds="0,1", epochs=1.0, equal_time=False, batch_size=128, threads=1,
                eval_train=100, eval_test=100, attentive_train=100, set=[], name=None,
                results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    return argparse.Namespace(**{**base, **kw})


def test_a_rerun_skips_finished_rows_and_keeps_the_order(v2, tmp_path, monkeypatch):
    launcher = _Launcher(v2, tmp_path / "results")
    monkeypatch.setattr(v2, "launch_row", launcher)
    v2.write_json(v2.row_file(tmp_path / "results" / "e1", "simmim", 0), _row("simmim", 0, 0.6))
    assert v2.run(_args(tmp_path)) == 0
    # mae first (the reference and the teacher), vqkd before the rows reading its tokenizer, the floor last
    assert launcher.calls == [("mae", 0), ("vqkd", 0), ("random init", 0),
                              ("mae", 1), ("vqkd", 1), ("simmim", 1), ("random init", 1)]
    launcher.calls.clear()
    assert v2.run(_args(tmp_path, seeds="0,1,2")) == 0  # a third seed later: only its rows run
    assert [s for _, s in launcher.calls] == [2, 2, 2, 2]
    with pytest.raises(SystemExit, match="epochs: 1.0 there, 2.0 here"):
        v2.run(_args(tmp_path, epochs=2.0, name="e1"))


def test_a_failed_row_is_not_recorded_and_runs_again(v2, tmp_path, monkeypatch):
    monkeypatch.setattr(v2, "launch_row", lambda *a: 1)
    assert v2.run(_args(tmp_path, methods="mae", seeds="0")) == 1
    assert not list((tmp_path / "results" / "e1").glob("mae-*.json"))


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_one_tiny_row_trains_measures_and_probes(v2, tmp_path):
    common = ["--epochs", "1", "--set", "model.depth=1", "--set", "data.limit=256", "--eval-train", "200",
              "--eval-test", "100", "--attentive-train", "100", "--threads", "1", "--name", "tiny",
              "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "w")]
    assert v2.main(["one", "--row", "mae", "--seed", "3", *common]) == 0
    r = json.loads((tmp_path / "r" / "tiny" / "mae-s3.json").read_text())
    assert r["steps"] == 2 and r["epochs"] == 1.0 and len(r["loss"]) == 2  # 256 images, batch 128
    assert r["flops_per_image"] > 1e6 and r["peak_rss_mib"] > 100 and r["s_per_epoch"] > 0
    assert 0.1 <= r["eval"]["linear"] <= 1 and r["eval_test"] == 100
    assert v2.main(["one", "--row", "random init", "--seed", "3", *common]) == 0
    floor = json.loads((tmp_path / "r" / "tiny" / "random_init-s3.json").read_text())
    assert "steps" not in floor and floor["eval"]["linear"] != r["eval"]["linear"]
