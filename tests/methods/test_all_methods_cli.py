"""Every method in the table runs through the command line: pretrain -> eval (kNN) -> visualize, and its
checkpoint resumes into the same weights. Tiny runs (2-block ViT, a few steps), so this checks the wiring;
each method's own test file pins what defines it and that its loss falls."""

import json
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.engine.checkpoint import method_from_checkpoint
from mimkit.methods import METHODS

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TINY = ["optim.max_steps=3", "optim.batch_size=16", "data.limit=64", "data.num_workers=0", "data.stats_samples=32",
        "data.val_fraction=0.02", "eval.knn_limit=100", "eval.num_images=2", "trainer.progress=false",
        "model.depth=2", "model.decoder_depth=1",
        # the demo recipe ends with a baseline table (minutes) and skips the plain kNN; wiring checks want the kNN
        "eval.knn=true", "eval.baseline_table=false"]
RECIPES = Path(__file__).resolve().parents[2] / "configs"


def wiring(name: str, request) -> list[str]:
    """What a recipe names outside itself (a teacher run, a tokenizer run), pointed at test fixtures."""
    from method_wiring import external_overrides

    return external_overrides(name, request)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_pretrains_evaluates_and_draws(name, tmp_path, capsys, request):
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    recipe = RECIPES / f"{name}_vit_tiny_fmnist.yaml"
    args = (["--config", str(recipe)] if recipe.exists() else [f"method={name}"]) + wiring(name, request)
    assert main(["pretrain", *args, *TINY, f"trainer.out_dir={tmp_path}", "trainer.run_name=r"]) == 0
    run = tmp_path / "r"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 3 and 0.0 < results["knn_top1"] <= 1.0
    assert torch.isfinite(torch.tensor(results["loss"]))
    assert (run / "reconstruction.png").exists() or (run / "masks.png").exists()
    capsys.readouterr()
    assert main(["eval", str(run), "eval.knn_limit=100"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    assert main(["visualize", str(run), "--out", str(tmp_path / "v.png"), "--num-images", "2"]) == 0
    drawn = capsys.readouterr().out.split("wrote ")[-1].strip()
    assert Path(drawn).is_file()
    method, cfg, _ = method_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert cfg.method.name == name and type(method).__name__ == METHODS[name].split(":")[1]


def test_a_distillation_run_evaluates_after_its_teacher_is_gone(tmp_path, teacher_checkpoint, capsys):
    """`mimkit eval` reads the student's encoder alone: the frozen teacher (outside the checkpoint) may have moved."""
    import shutil

    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    teacher = shutil.copy(teacher_checkpoint, tmp_path / "teacher.ckpt")
    assert main(["pretrain", "--config", str(RECIPES / "dtm_vit_tiny_fmnist.yaml"), *TINY,
                 f"method.teacher.source={teacher}", f"trainer.out_dir={tmp_path}", "trainer.run_name=r"]) == 0
    Path(teacher).unlink()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "eval.knn_limit=100"]) == 0
    assert "kNN top-1" in capsys.readouterr().out


def test_every_method_has_a_recipe():
    missing = [n for n in METHODS if not (RECIPES / f"{n}_vit_tiny_fmnist.yaml").exists()]
    assert not missing, f"methods without configs/<name>_vit_tiny_fmnist.yaml: {missing}"


def test_a2mim_on_a_resnet_runs_through_the_cli(tmp_path, capsys):
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    from mimkit.config import load_config

    # the CIFAR-10 recipe is valid (its data needs a download, so the run below uses Fashion-MNIST)
    assert load_config(RECIPES / "a2mim_resnet18_cifar10.yaml").model.encoder == "resnet18"
    args = ["--config", str(RECIPES / "a2mim_vit_tiny_fmnist.yaml"), *TINY, "model.encoder=resnet18",
            f"trainer.out_dir={tmp_path}", "trainer.run_name=r"]
    assert main(["pretrain", *args]) == 0
    run = tmp_path / "r"
    assert (run / "reconstruction.png").exists()
    capsys.readouterr()
    assert main(["eval", str(run), "eval.knn_limit=100"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    method, cfg, _ = method_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert type(method.encoder).__name__ == "ResNetEncoder"
