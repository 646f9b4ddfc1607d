"""A folder of ordinary photos from the command line: mixed grey/colour, visualize, eval's exits and progress."""

import shutil

import pytest
from PIL import Image

from mimkit.cli import main

TINY = ["data.source=folder", "data.img_size=16", "data.val_fraction=0.25", "data.num_workers=0",
        "model.patch_size=4", "model.depth=1", "optim.batch_size=4", "optim.max_steps=2", "eval.num_images=2",
        "eval.recon_every_epochs=0"]


@pytest.fixture(scope="module")
def photos(real_images_dir, tmp_path_factory):
    """12 photos, 4 of them grey-scale (MNIST-like), 8 colour (CIFAR), in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    files = sorted(real_images_dir.glob("cifar10_0*.png"))[:8] + sorted(real_images_dir.glob("mnist_0*.png"))[:4]
    for k, f in enumerate(files):
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        shutil.copy(f, root / f"c{k % 2}" / f.name)
    return root


@pytest.fixture(scope="module")
def run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", *TINY, f"data.path={photos}", f"trainer.out_dir={out}", "trainer.run_name=r"]) == 0
    return out / "r"


def test_mixed_grey_and_colour_folder_trains_and_says_so(run):
    """The run trained (the fixture), and its data report (printed at the start) says what was converted."""
    import json

    report = json.loads((run / "data_report.json").read_text())
    assert report["notes"] == ["converted 4 grey-scale image(s) to 3 channel(s), the folder's usual count "
                               "(8 of 12 images); set data.channels to choose"]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_visualize_keeps_the_training_picture_and_says_where_images_come_from(run, tmp_path, capsys):
    training_picture = (run / "reconstruction.png").read_bytes()
    assert main(["visualize", str(run), "--num-images", "6"]) == 0
    out = capsys.readouterr().out
    assert "note: the held-out split has 3 image(s); 3 more are drawn from the training images" in out
    assert (run / "reconstruction.png").read_bytes() == training_picture
    drawn = Image.open(run / "visualize" / "reconstruction.png")
    assert drawn.size[1] > Image.open(run / "reconstruction.png").size[1]  # 6 rows, not 2
    assert main(["visualize", str(run), "--num-images", "50", "--out", str(tmp_path / "all.png")]) == 0
    assert "asked for 50 images, drawing 12: that is all the data holds" in capsys.readouterr().out


def test_eval_on_unlabelled_folder_is_a_user_error(run, capsys):
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: evaluation needs labelled images") and len(err.splitlines()) == 1


def test_eval_knn_shows_progress(run, photos, capsys):
    assert main(["eval", str(run), "data.source=imagefolder", f"data.path={photos}"]) == 0
    captured = capsys.readouterr()
    assert "kNN top-1" in captured.out
    assert "knn: encoding" in captured.err and "img" in captured.err  # a bar for the bank and one for the queries


def test_a_batch_larger_than_the_folder_is_fitted_to_it_and_said(photos, tmp_path, capsys):
    """12 photos, 3 held out: a recipe's batch of 128 becomes 9 (one step per epoch) instead of an error."""
    import yaml

    overrides = [x for x in TINY if not x.startswith("optim.")] + ["optim.batch_size=128", "optim.max_steps=2"]
    assert main(["pretrain", *overrides, f"data.path={photos}", f"trainer.out_dir={tmp_path}",
                 "trainer.run_name=r"]) == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert "optim.batch_size=128 is more than the 9 training images: using optim.batch_size=9" in said, said
    assert "of 9 images = 1 device(s) x 9 x 1 accumulation" in said, said
    stored = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert stored["optim"]["batch_size"] == 9   # what a resume continues with
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()
