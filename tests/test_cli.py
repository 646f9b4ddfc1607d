"""The command line end to end on a tiny run: pretrain -> info / eval / visualize / export / --init."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mimkit.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TINY = ["optim.max_steps=4", "optim.batch_size=32", "data.limit=256", "data.num_workers=0", "data.stats_samples=64",
        "eval.knn_limit=300", "eval.num_images=3", "trainer.progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    out = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", *TINY, f"trainer.out_dir={out}", "trainer.run_name=tiny"]) == 0
    return out / "tiny"


def test_pretrain_writes_the_run_folder(run_dir):
    for name in ("config.yaml", "metrics.csv", "results.json", "reconstruction.png", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 4 and 0.1 < results["knn_top1"] <= 1.0
    assert Image.open(run_dir / "reconstruction.png").size[0] > 0


def test_info_eval_visualize_export(run_dir, tmp_path, capsys):
    assert main(["info", str(run_dir)]) == 0
    assert "vit_tiny" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--json", str(tmp_path / "knn.json"), "eval.knn_limit=200"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "knn.json").read_text())["queries"] == 200
    assert main(["visualize", str(run_dir), "--out", str(tmp_path / "r.png"), "--num-images", "2"]) == 0
    assert Image.open(tmp_path / "r.png").size[1] > 0
    assert main(["export", str(run_dir), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    assert (tmp_path / "timm" / "model.safetensors").exists()


def test_init_from_exported_and_reimported_weights(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--format", "mae", "--out", str(tmp_path / "mae")]) == 0
    assert main(["import-mae", str(tmp_path / "mae"), "--out", str(tmp_path / "imported.ckpt")]) == 0
    code = main(["pretrain", "--init", str(tmp_path / "imported.ckpt"), *TINY, "optim.max_steps=2", "eval.knn=false",
                 "eval.visualize=false", f"trainer.out_dir={tmp_path}", "trainer.run_name=cont"])
    assert code == 0 and (tmp_path / "cont" / "checkpoints" / "last.ckpt").exists()


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["pretrain", "optim.base_lrr=1"]) == 2
    assert "did you mean 'base_lr'" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_default_outputs_go_into_the_run_folder(run_dir):
    assert main(["visualize", str(run_dir), "--num-images", "2"]) == 0
    assert (run_dir / "visualize" / "reconstruction.png").is_file()
    assert main(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--format", "mae"]) == 0
    assert (run_dir / "export-mae" / "model.safetensors").is_file()


def test_pretrain_ends_with_the_baseline_table_when_asked(tmp_path, capsys):
    """eval.baseline_table: the run's encoder, the same architecture at random init and raw pixels, every
    eval.label_cells cell, printed and stored (results.json and eval/baselines.json)."""
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    code = main(["pretrain", *TINY, "model.depth=1", "model.patch_size=7", "eval.knn=false", "eval.visualize=false",
                 "eval.baseline_table=true", "eval.label_cells=[linear@0.01]", "eval.linear_epochs=2",
                 f"trainer.out_dir={tmp_path}", "trainer.run_name=table"])
    assert code == 0
    results = json.loads((tmp_path / "table" / "results.json").read_text())
    table = results["baseline_table"]
    assert set(table) == {"pretrained", "random_init", "raw_pixels"}
    assert all(0.0 < row["linear@0.01"] <= 1.0 for row in table.values())
    stored = json.loads((tmp_path / "table" / "eval" / "baselines.json").read_text())
    # 1% of every class's training images outside the validation split (10%): 54 of each class's 5,400
    assert stored["splits"]["subsets"]["0.01"]["size"] == 540
    out = capsys.readouterr().out
    assert "| raw_pixels |" in out and "linear@0.01" in out
