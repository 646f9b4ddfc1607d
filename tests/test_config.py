import pytest

from mimkit.config import ConfigError, PretrainConfig, load_config, to_yaml


def test_defaults_are_the_demo_recipe():
    cfg = load_config()
    assert cfg.method.name == "mae" and cfg.model.encoder == "vit_tiny" and cfg.model.patch_size == 4
    assert cfg.data.source == "fashion_mnist"


def test_overrides_are_typed():
    cfg = load_config(overrides=["optim.base_lr=3e-4", "data.img_size=[32, 48]", "trainer.precision=bf16", "data.mean=null", "optim.clip_grad=1"])
    assert cfg.optim.base_lr == 3e-4 and cfg.data.img_size == (32, 48)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.optim.clip_grad == 1.0


def test_unknown_key_names_the_field_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optim.base_lrr=1e-3"])
    msg = str(err.value)
    assert "optim.base_lrr" in msg and "did you mean 'base_lr'" in msg and "allowed:" in msg


def test_bad_value_names_the_field_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method.mask_ratio=1.5"])
    assert "method.mask_ratio" in str(err.value) and "1.5" in str(err.value)
    with pytest.raises(ConfigError, match="model.encoder"):
        load_config(overrides=["model.encoder=vit_gigantic"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(overrides=["data.source=folder"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(overrides=["optim.lr"])


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = load_config(overrides=["optim.epochs=3"])
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")


def test_method_switch_resets_method_section():
    cfg = load_config(overrides=["method.mask_ratio=0.5", "method=mae"])
    assert cfg.method.mask_ratio == 0.75
    with pytest.raises(ConfigError, match="method"):
        load_config(overrides=["method=nonexistent"])


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert recipes, "configs/ holds no recipe"
    for path in recipes:
        assert isinstance(load_config(path), PretrainConfig)


def test_apply_overrides_limits_sections():
    from mimkit.config import apply_overrides

    cfg = load_config()
    changed = apply_overrides(cfg, ["data.limit=10", "eval.knn_k=5"])
    assert changed.data.limit == 10 and changed.eval.knn_k == 5 and cfg.data.limit is None
    with pytest.raises(ConfigError, match="only data.\\* and eval.\\*"):
        apply_overrides(cfg, ["model.encoder=vit_base"])


def test_method_section_is_validated_by_the_named_methods_own_settings():
    with pytest.raises(ConfigError, match=r"unknown method 'maee' \(did you mean 'mae'\?\)"):
        load_config(overrides=["method=maee"])
    with pytest.raises(ConfigError, match=r"unknown field 'method.mask_ratoi' \(did you mean 'mask_ratio'\?\)"):
        load_config(overrides=["method.mask_ratoi=0.5"])
    with pytest.raises(ConfigError, match=r"field 'method.mask_ratio'"):
        load_config(overrides=["method.mask_ratio=1.5"])
    cfg = load_config(overrides=["method=mae", "method.norm_pix=false"])
    assert cfg.method.name == "mae" and cfg.method.norm_pix is False
    # the dump keeps the method's own fields, so a saved config loads back the same
    assert load_config(base=cfg.model_dump(mode="json")) == cfg


def test_a_partial_override_of_a_nested_setting_keeps_the_methods_defaults_for_it():
    from mimkit.config import load_config

    cfg = load_config(overrides=["method=ijepa", "method.teacher.start=0.99"])
    assert cfg.method.teacher.kind == "linear" and cfg.method.teacher.start == 0.99 and cfg.method.teacher.end == 1.0
    cfg = load_config(overrides=["method=ibot", "method.teacher.kind=staged", "method.teacher.stages=[[0.5,0.999]]"])
    assert cfg.method.teacher.kind == "staged" and cfg.method.teacher.start == 0.996
    assert cfg.method.teacher.stages == [(0.5, 0.999)]
    with pytest.raises(Exception, match="teacher"):
        load_config(overrides=["method=ibot", "method.teacher.strat=0.9"])


def test_patch_size_that_does_not_tile_the_image_is_a_config_error(capsys):
    from mimkit.cli import main

    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.patch_size=5"])  # 28 px
    msg = str(err.value)
    assert "model.patch_size=5" in msg and "data.img_size=28" in msg and "[2, 4, 7, 14, 28]" in msg
    load_config(overrides=["model.patch_size=7"])
    assert main(["pretrain", "model.patch_size=5", "data.img_size=[28, 32]"]) == 2
    err_text = capsys.readouterr().err
    assert "model.patch_size=5 does not divide data.img_size=(28, 32)" in err_text and "[2, 4]" in err_text
    assert "Traceback" not in err_text and len(err_text.splitlines()) == 2 and "field 'model'" in err_text


def test_trainer_devices_takes_gpu_indices_and_fabric_gets_them(monkeypatch):
    import lightning.fabric

    from mimkit.engine.trainer import make_fabric

    cfg = load_config(overrides=["trainer.devices=[1]", "trainer.accelerator=cuda"])
    assert cfg.trainer.devices == [1]
    assert load_config(overrides=["trainer.devices=[0, 2]"]).trainer.devices == [0, 2]
    assert load_config(overrides=["trainer.devices=2"]).trainer.devices == 2
    for bad, words in (("[0, 0]", "distinct"), ("[-1]", "distinct"), ("[]", "no device"), ("0", ">= 1")):
        with pytest.raises(ConfigError, match=words):
            load_config(overrides=[f"trainer.devices={bad}"])
    with pytest.raises(ConfigError, match="lists GPU indices"):
        load_config(overrides=["trainer.devices=[0]", "trainer.accelerator=cpu"])
    seen = {}

    class Recorder:  # stands in for Fabric: what make_fabric hands to it
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(lightning.fabric, "Fabric", Recorder)
    make_fabric(cfg.trainer)
    assert seen["devices"] == [1] and seen["accelerator"] == "cuda"


def test_trainer_devices_list_selects_that_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mimkit.engine.trainer import make_fabric

    last = torch.cuda.device_count() - 1
    fabric = make_fabric(load_config(overrides=[f"trainer.devices=[{last}]", "trainer.accelerator=cuda"]).trainer)
    assert fabric.device == torch.device("cuda", last) and fabric.world_size == 1


def test_print_config_keeps_field_descriptions_as_comments_and_loads_back(tmp_path, capsys):
    from mimkit.cli import main
    from mimkit.config import DataConfig, OptimConfig

    overrides = ["method=ibot", "optim.lr=3e-05", "data.img_size=[32, 48]", "trainer.devices=[0, 1]",
                 "data.crop_ratio=[0.5, 2.0]"]
    assert main(["pretrain", "--print-config", *overrides]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for line, description in (("  val_fraction: 0.05", DataConfig.model_fields["val_fraction"].description),
                              ("  batch_size: 256", OptimConfig.model_fields["batch_size"].description)):
        assert lines[lines.index(line) - 1] == "  # " + description
    assert sum(x.lstrip().startswith("# ") for x in lines) > 50
    (tmp_path / "printed.yaml").write_text(text)
    again = load_config(tmp_path / "printed.yaml")
    assert again == load_config(overrides=overrides)
    assert to_yaml(again) == to_yaml(load_config(overrides=overrides))


def test_folder_recipe_starts_small_enough_for_a_laptop_cpu():
    """configs/mae_folder.yaml: a small image, a small ViT and few tokens (it was ViT-S at 96 x 128)."""
    from pathlib import Path

    from mimkit.methods import build_method

    recipe = Path(__file__).resolve().parents[1] / "configs" / "mae_folder.yaml"
    cfg = load_config(recipe, ["data.path=/tmp"])
    size = cfg.data.img_size if isinstance(cfg.data.img_size, int) else max(cfg.data.img_size)
    assert 64 <= size <= 96 and cfg.model.patch_size == 8 and cfg.optim.batch_size <= 64
    method = build_method(cfg, (size, size), 3)
    params = sum(p.numel() for p in method.encoder.parameters())
    assert method.encoder.grid.num_patches <= 144 and params < 2_000_000, (method.encoder.grid.num_patches, params)
    assert "GPU" in recipe.read_text()  # it says how to scale up
