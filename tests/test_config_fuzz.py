"""Property tests: random settings reach the user as an error naming the field, never as a traceback.

`load_config` either returns a config (which then survives the trip through `config.yaml` that every run
makes) or raises ConfigError whose message names what is wrong: a field, an unknown field, an unknown
method, the malformed override or the config file. The loader side: a random `data.*` section over small
folders of generated, odd and broken images either builds (and its items are finite tensors of the promised
shape) or raises DataError/ConfigError naming the setting or the file.
"""

from __future__ import annotations

import re
import warnings
import zlib

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from mimkit.config import ConfigError, PretrainConfig, load_config, method_config_class, to_yaml  # noqa: E402
from mimkit.data import DataError, build_pretrain_data  # noqa: E402
from mimkit.methods import METHODS  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)

SECTIONS = {name: field.annotation for name, field in PretrainConfig.model_fields.items() if name != "method"}
FIELD_PATHS = sorted(f"{s}.{f}" for s, model in SECTIONS.items() for f in model.model_fields)
METHOD_FIELDS = sorted({f for m in METHODS for f in method_config_class(m).model_fields})
METHOD_PATHS = [f"method.{f}" for f in METHOD_FIELDS]

# a message that says what is wrong: a field, an unknown field or method, the override, or the file
NAMES_PROBLEM = re.compile(r"field '|unknown method|override .+ (?:is not of the form|has an empty key)|config file ")

ident = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10**20, max_value=10**20),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 16, 28, 256, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.5, -0.1, 1e-9, 1e30]),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda", "ddp", "fsdp", "bf16", "32", "skip", "error", "folder", "imagefolder",
                     "torchvision", "fashion_mnist", "CIFAR10", "vit_small", "resnet18", "mae", "random", "block",
                     "coarse", "cls", "mean", "tiny", "mae"] + list(METHODS)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(ident, st.sampled_from(
        ["name", "mask_ratio", "path", "source"])), inner, max_size=4)),
    max_leaves=8,
)
keys = st.one_of(
    st.sampled_from(FIELD_PATHS + METHOD_PATHS + ["method", "method.name", "data", "optim", "model"]),
    st.builds(lambda s, f: f"{s}.{f}", st.sampled_from(sorted(SECTIONS) + ["method"]), ident),
    st.builds(".".join, st.lists(st.one_of(ident, st.just("")), min_size=1, max_size=4)),
    st.text(max_size=10).filter(lambda k: "=" not in k),
)


def _raw(value) -> str:
    """How a user would type `value` after `key=` (YAML flow style; plain strings also typed bare)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={_raw(v)}", keys, values),
        st.builds(lambda v: f"method={v}", st.sampled_from(list(METHODS)) | ident),
        st.text(max_size=20),  # anything at all, with or without '='
    ),
    max_size=6,
)
# one setting at a time on an otherwise valid recipe: every field (and `method`, `method.name`) gets junk
one_bad = st.builds(lambda m, k, v: ([f"method={m}"] if m else []) + [f"{k}={_raw(v)}"],
                    st.sampled_from([None, *METHODS]),
                    st.sampled_from(FIELD_PATHS + METHOD_PATHS + ["method", "method.name"] * 20), values)

trees = st.recursive(
    st.dictionaries(st.one_of(st.sampled_from(sorted(SECTIONS) + ["method"]), ident), values, max_size=4),
    lambda inner: st.dictionaries(
        st.sampled_from(sorted(SECTIONS) + ["method", "name", "mask_ratio"] + [p.split(".")[1] for p in FIELD_PATHS]),
        st.one_of(values, inner), max_size=5),
    max_leaves=12,
)


def _check(call):
    """Run `call` (-> PretrainConfig or ConfigError); any other exception fails the test with its traceback."""
    try:
        cfg = call()
    except ConfigError as err:
        msg = str(err)
        assert NAMES_PROBLEM.search(msg), f"ConfigError does not name the problem: {msg!r}"
        event("config: ConfigError")
        return None
    assert isinstance(cfg, PretrainConfig)
    event("config: valid")
    return cfg


def _round_trip(cfg, tmp_path):
    """What every run does: write config.yaml, read it back (resume, eval) -> the same settings."""
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@FUZZ
@given(items=st.one_of(overrides, one_bad))
@example(items=["method.name=[1]"])  # an unhashable method name
@example(items=["trainer.precision=[]"])  # an unhashable precision (the alias table is a dict)
@example(items=["method={a: 1}"])
@example(items=["eval.knn_temperature=.inf"])  # accepted, and must survive config.yaml
@example(items=["data.mean=[.nan]", "data.std=[1.0]"])
@example(items=["optim.lr=1e400"])
@example(items=["data..path=x", "=1", ".=2"])
def test_random_overrides_name_the_field(items, tmp_path_factory):
    cfg = _check(lambda: load_config(None, items))
    if cfg is not None:
        _round_trip(cfg, tmp_path_factory.mktemp("rt"))


@FUZZ
@given(tree=trees, items=overrides)
def test_random_yaml_recipes_name_the_field(tree, items, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = _check(lambda: load_config(path, items))
    if cfg is not None:
        _round_trip(cfg, path.parent)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(text=st.one_of(st.text(max_size=60), st.sampled_from([
    "- a\n- b\n", "optim: [1, 2\n", "42", "!!python/object:os.system {}", "data: {source: folder}\n", "method: 5\n",
    "method: {name: [1]}\n", "method: {name: {a: 1}}\n", "trainer: {precision: [bf16]}\n"])))
def test_random_yaml_text_names_the_file_or_field(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("txt") / "recipe.yaml"
    path.write_text(text)
    _check(lambda: load_config(path))


# ---------------------------------------------------------------------------------------------- loader side


def _png(path, arr):
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Small folders: grey + RGB (inconsistent channels), RGB only, grey in class sub-folders, RGB plus odd
    and broken files, only broken files, an empty folder, a plain file, a missing path."""
    root = tmp_path_factory.mktemp("fuzzdata")
    rng = np.random.default_rng(0)
    mixed, rgb, broken, bad_only, empty = (root / n for n in ("mixed", "rgb", "broken", "bad_only", "empty"))
    for d in (mixed, rgb, broken, bad_only, empty):
        d.mkdir()
    for i in range(3):
        arr = rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
        _png(rgb / f"c{i}.png", arr)
        _png(broken / f"c{i}.png", arr)
        _png(mixed / f"c{i}.png", arr)
        _png(mixed / f"g{i}.png", arr[..., 0])
    Image.fromarray(rng.integers(0, 65535, (9, 9), dtype=np.uint16)).save(broken / "g16.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA").save(broken / "rgba.png")
    data = (rgb / "c0.png").read_bytes()
    for d in (broken, bad_only):
        (d / "cut.png").write_bytes(data[: len(data) // 2])  # header intact: fails at load time
        (d / "empty.png").write_bytes(b"")
        (d / "noise.jpg").write_bytes(rng.bytes(300))
    def chunk(tag, body):
        return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")

    ihdr = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 30000 x 30000 grey claimed, no pixels
    (broken / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                      + chunk(b"IDAT", zlib.compress(bytes(30001))) + chunk(b"IEND", b""))
    (root / "file.png").write_bytes(data)
    for k, name in enumerate("ab"):
        (root / "classes" / name).mkdir(parents=True)
        for i in range(3):
            _png(root / "classes" / name / f"{i}.png", rng.integers(0, 256, (9, 11 + k), dtype=np.uint8))
    paths = {"classes": root / "classes", "mixed": mixed, "rgb": rgb, "broken": broken, "bad_only": bad_only,
             "empty": empty, "file": root / "file.png", "missing": root / "missing"}
    return root, {k: str(v) for k, v in paths.items()}


def _data_overrides():
    """Mostly sensible `data.*` settings (so that many runs build), plus at times one junk value."""
    pair = st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(sorted)
    sane = {
        "data.img_size": st.one_of(st.integers(1, 24), st.tuples(st.integers(1, 24), st.integers(1, 24))),
        "data.channels": st.sampled_from([None, None, 1, 3, 3, 2, 4]),
        "data.val_fraction": st.sampled_from([0.0, 0.0, 0.2, 0.5, 0.9]),
        "data.limit": st.one_of(st.none(), st.integers(1, 8)),
        "data.stats_samples": st.integers(1, 5),
        "data.crop_scale": pair,
        "data.crop_ratio": pair.map(lambda r: [r[0], r[1] * 2]),
        "data.on_error": st.sampled_from(["skip", "error"]),
        "data.split_seed": st.integers(0, 2**40),
        "data.hflip": st.booleans(),
    }
    norm = st.integers(1, 3).flatmap(lambda c: st.tuples(st.lists(st.floats(-1, 1), min_size=c, max_size=c),
                                                          st.lists(st.floats(0.01, 2), min_size=c, max_size=c)))
    junk = st.tuples(st.sampled_from(sorted(sane) + ["data.mean", "data.std", "data.path", "data.nme"]), values)
    return st.tuples(
        st.sampled_from(["rgb"] * 3 + ["classes", "broken"] * 2 + ["mixed", "bad_only", "empty", "file", "missing"]),
        st.fixed_dictionaries({"data.source": st.sampled_from(["folder"] * 3 + ["imagefolder"])}, optional=sane),
        st.one_of(st.none(), st.none(), norm),
        st.one_of(st.none(), st.none(), st.none(), junk),
    )


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(chosen=_data_overrides())
@example(chosen=("broken", {"data.source": "folder", "data.channels": 3, "data.on_error": "skip"}, None, None))
@example(chosen=("broken", {"data.source": "folder", "data.channels": 1, "data.on_error": "skip",
                            "data.val_fraction": 0.5}, ([0.5], [0.2]), None))
@example(chosen=("mixed", {"data.source": "folder", "data.channels": 4, "data.img_size": [5, 17]}, None, None))
@example(chosen=("classes", {"data.source": "imagefolder", "data.val_fraction": 0.5, "data.limit": 1}, None, None))
@example(chosen=("bad_only", {"data.source": "folder", "data.on_error": "skip"}, None, None))
def test_random_data_settings_build_or_name_the_problem(chosen, folders, tmp_path_factory):
    root, paths = folders
    folder, settings_, norm, junk = chosen
    chosen = {"data.path": paths[folder], **settings_}
    if norm is not None:
        chosen["data.mean"], chosen["data.std"] = norm
    if junk is not None:
        chosen[junk[0]] = junk[1]
    items = [f"{k}={_raw(v)}" for k, v in chosen.items()]
    cfg = _check(lambda: load_config(None, items))
    if cfg is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped files and constant channels warn; the report has them
            data = build_pretrain_data(cfg.data, report_dir=tmp_path_factory.mktemp("run"))
            got = [data.train[i]["image"] for i in range(len(data.train))] + [data.val[0]["image"]
                                                                               for _ in range(len(data.val) > 0)]
    except (DataError, ConfigError) as err:
        event(f"data: {type(err).__name__}: " + re.sub(r"/\S+", "PATH", str(err))[:50])
        msg = str(err)
        assert str(root) in msg or "data." in msg or "data set" in msg or "channel" in msg, msg
        return
    event(f"data: built from {folder}")
    h, w = data.img_size
    assert len(data.mean) == len(data.std) == data.channels
    for x in got:
        assert x.shape == (data.channels, h, w) and bool(x.isfinite().all())
    rep = data.report
    if cfg.data.limit is None:
        assert rep.usable == len(data.train) + len(data.val)
    else:
        assert rep.usable >= len(data.train) + len(data.val) and len(data.train) <= cfg.data.limit
    if chosen["data.path"] == paths["broken"]:  # it built, so the broken files were skipped and reported
        assert cfg.data.on_error == "skip"
        reasons = {p.rsplit("/", 1)[-1]: r for p, r in rep.unreadable}
        assert sorted(reasons) == ["bomb.png", "empty.png", "noise.jpg"]
        assert "decompression" in reasons["bomb.png"] and "empty file" in reasons["empty.png"]
        assert {p.rsplit("/", 1)[-1] for p, _ in rep.load_errors()} <= {"cut.png"}
