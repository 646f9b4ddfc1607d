"""`mimkit report`: a tiny real run (MAE on the sample images, a few steps), its HTML page, and that page
rendered in headless Chromium (sections present, every embedded image decoded)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine import train
from mimkit.viz.plots import line_chart_svg
from mimkit.report import SECTIONS, build_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
HEADINGS = list(SECTIONS.values())


def _tiny_config(out_dir: Path, images: Path, *extra: str):
    return load_config(None, [
        f"trainer.out_dir={out_dir}", "trainer.run_name=run", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress=false", "trainer.log_every_steps=1", "data.num_workers=0", "data.source=folder",
        f"data.path={images}", "data.channels=3", "data.img_size=16", "data.limit=16", "data.val_fraction=0.1",
        "data.stats_samples=50", "model.encoder=vit_tiny", "model.patch_size=4", "model.decoder=tiny",
        "optim.batch_size=8", "optim.lr=1e-3", "optim.epochs=2", "optim.warmup_fraction=0.3",
        "eval.knn=false", "eval.visualize=false", "eval.num_images=4", *extra,
    ])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, real_images_dir) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(_tiny_config(tmp_path_factory.mktemp("runs"), real_images_dir))
    finally:
        torch.set_num_threads(n)
    run = Path(res.run_dir)
    (run / "results.json").write_text(json.dumps({**res.metrics, "knn_top1": 0.4242, "knn_k": 20}))
    (run / "eval").mkdir()
    (run / "eval" / "linear.json").write_text(json.dumps(
        {"protocol": "linear", "metric": "top1", "value": 0.6137, "details": {"best_lr": 0.1}, "seconds": 3.2}))
    return run


def test_training_saves_reconstructions_every_epoch(run_dir):
    # 16 images, batch 8: 2 steps per epoch, 2 epochs -> a grid after step 2 and after step 4
    assert sorted(p.name for p in (run_dir / "recon").iterdir()) == ["step_000002.png", "step_000004.png"]
    from PIL import Image

    a, b = (Image.open(run_dir / "recon" / f"step_00000{s}.png") for s in (2, 4))
    assert a.size == b.size and a.mode == "RGB" and a.size[1] > a.size[0] // 2  # 4 rows, 4 columns
    assert a.tobytes() != b.tobytes()  # the model changed between the two epochs


def test_recon_every_epochs_zero_disables(tmp_path, real_images_dir):
    torch.set_num_threads(1)
    res = train(_tiny_config(tmp_path, real_images_dir, "optim.epochs=1", "eval.recon_every_epochs=0"))
    assert not (Path(res.run_dir) / "recon").exists()


def test_report_is_one_self_contained_page(run_dir, tmp_path):
    out = build_report(run_dir, tmp_path / "r.html", num_images=2, analysis_images=8)
    html = out.read_text()
    for h in HEADINGS:
        assert f">{h}</h2>" in html, h
    assert "class=\"note\"" not in html  # every section found its data
    # nothing is loaded from elsewhere: every src is a data URI, no stylesheet or script links
    srcs = re.findall(r'\bsrc="([^"]*)"', html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,")) for s in srcs)
    assert not re.search(r'(href|src)="(https?:|//|file:)', html) and "<link" not in html and "<script" not in html
    # training curves, 2 reconstruction grids, attention grid + colour bar, 7 analysis charts
    assert len(srcs) >= 3 + 2 + 2 + 7
    assert "step 2" in html and "step 4" in html
    assert "61.37%" in html and "42.42%" in html and "best_lr=0.1" in html  # probe table: eval/*.json + results
    assert "model:" in html and "encoder: vit_tiny" in html  # the config
    analysis = json.loads((tmp_path / "r_analysis.json").read_text())
    assert len(analysis["attention_distance"]) == 12 and len(analysis["attention_distance"][0]) == 3


def test_report_without_checkpoint_or_images_says_why(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss,lr\n1,2.0,0.001\n2,1.5,0.002\n")
    html = build_report(run).read_text()
    assert all(f">{h}</h2>" in html for h in HEADINGS)
    assert "needs the checkpoint" in html and "no probe results yet" in html and "no config.yaml" in html
    assert html.count("data:image/svg+xml") == 2  # loss and lr


def test_cli_report(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(run_dir), "--out", str(out), "--no-model"]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(run_dir), "--out", str(out), "optim.lr=1"]) == 2  # only data.*/eval.* here


def test_svg_charts_are_valid_xml():
    svg = line_chart_svg([{"x": [1, 2, 3, 4], "y": [1.0, float("nan"), 0.5, 0.25], "label": "a & b"},
                          {"x": [2], "y": [0.7], "label": "single"}, {"x": [], "y": [], "label": "empty"}],
                         "t <1>", "x", "y")
    root = ET.fromstring(svg)
    assert root.get("width") == "560" and root.get("height") == "320"
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 1
    log = line_chart_svg([{"x": [1, 2, 3], "y": [1e3, 1.0, 0.0]}], log_y=True)  # zero skipped on a log axis
    ET.fromstring(log)
    assert "no data" in line_chart_svg([{"x": [1], "y": [float("inf")]}])


_PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.push(im.complete + ':' + im.naturalWidth + 'x' + im.naturalHeight);
  }
  var h = [];
  document.querySelectorAll('section h2').forEach(function (e) { if (e.offsetHeight > 0) h.push(e.textContent); });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({images: out, headings: h});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], tmp_path: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = build_report(run_dir, tmp_path / "report.html", num_images=2, analysis_images=8)
    n_img = page.read_text().count("<img ")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    res = _chromium(["--dump-dom", probe.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:]
    got = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert got["headings"] == HEADINGS  # every section rendered, in order
    assert len(got["images"]) == n_img >= 14
    sizes = [tuple(int(v) for v in s.split(":")[1].split("x")) for s in got["images"]]
    assert all(s.startswith("true:") for s in got["images"]), got["images"]
    assert all(w > 0 and h > 0 for w, h in sizes), got["images"]  # every PNG and SVG decoded
    # and a screenshot of the page itself (for people looking at the test's output)
    shot = tmp_path / "report.png"
    res = _chromium(["--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000


def test_report_draws_the_online_probe_curve(tmp_path):
    run = tmp_path / "probed"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss,lr,online_knn,online_linear\n0,,,0.5,0.6\n1,2.0,0.001,,\n"
                                     "2,1.5,0.002,0.7,0.8\n")
    html = build_report(run).read_text()
    assert html.count("data:image/svg+xml") == 3  # loss, lr and the online probe
    assert "online probe on fixed held-out images" in html


def test_probe_table_lists_the_same_knn_once(tmp_path):
    from mimkit.report import probe_rows

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"knn_top1": 0.6868, "knn_k": 20, "knn_temperature": 0.07,
                                                  "pool": "cls", "bank_size": 10000, "queries": 10000}))
    same = {"protocol": "knn", "metric": "top1", "value": 0.6868, "seconds": 50.0,
            "details": {"k": 20, "temperature": 0.07, "pool": "cls", "layers": None, "bank_size": 10000,
                        "queries": 10000}}
    (run / "eval" / "knn.json").write_text(json.dumps(same))
    rows = probe_rows(run)
    assert len(rows) == 1 and rows[0]["metric"] == "top1" and rows[0]["source"] == "results.json, eval/knn.json"
    other = {**same, "value": 0.7, "details": {**same["details"], "k": 10}}
    (run / "eval" / "knn.json").write_text(json.dumps(other))
    rows = probe_rows(run)
    assert [(r["metric"], r["details"]["k"]) for r in rows] == [("top1", 20), ("top1", 10)]
