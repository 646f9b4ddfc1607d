"""CLIP-family teachers through load_encoder: transformers CLIP / SigLIP / DINOv2 folders or cached hub names
(`hf:`), open_clip image towers (`open_clip:`), the `#proj` head, and a FrozenTeacher built on each.

Every model here is a tiny random one written to tmp folders (no network): the references are the libraries' own
outputs (pooled CLIP embeddings, last hidden states, a model truncated to one block)."""

import json
import shutil

import pytest
import torch

from mimkit.engine.checkpoint import CheckpointError
from mimkit.backends import CLIP_MEAN, CLIP_STD, is_external_spec, load_encoder
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4, projection_dim=12)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PREP = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}


def _images(n=2, channels=3, size=16, seed=1):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """A CLIPVisionModel folder (with a preprocessor_config.json) and a full CLIPModel folder (without)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    tower.save_pretrained(root / "vision")
    (root / "vision" / "preprocessor_config.json").write_text(json.dumps(PREP))
    full = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=12)).eval()
    full.save_pretrained(root / "full")
    return root / "vision", tower, root / "full", full


def test_clip_vision_tower_tokens_layers_and_stats(clip_folders):
    from transformers import CLIPVisionModel

    folder, tower, _, _ = clip_folders
    enc, size, channels, mean, std = load_encoder(f"hf:{folder}")
    assert (size, channels, mean, std) == ((16, 16), 3, PREP["image_mean"], PREP["image_std"])
    assert (enc.depth, enc.embed_dim, enc.grid_size) == (2, 32, (4, 4))
    x = _images()
    one_block = CLIPVisionModel.from_pretrained(folder, num_hidden_layers=1).eval()
    with torch.no_grad():
        ref = tower(pixel_values=x)
        tokens = enc(x)
        first, last = enc.forward_layers(x, [0, -1])
        assert tokens.shape == (2, 1 + 16, 32)
        # forward: post_layernorm on every token, so the class token is CLIP's pooled output
        torch.testing.assert_close(tokens[:, 0], ref.pooler_output)
        torch.testing.assert_close(last, ref.last_hidden_state)  # blocks' outputs, before the final norm
        torch.testing.assert_close(first, one_block(pixel_values=x).last_hidden_state)  # block 0, not the embedding
        grey = x[:, :1]
        torch.testing.assert_close(enc(grey), enc(grey.expand(-1, 3, -1, -1)))


def test_full_clip_folder_gives_its_vision_tower_and_projection(clip_folders):
    vision_folder, _, folder, full = clip_folders
    loaded = load_encoder(f"hf:{folder}")
    assert (loaded.mean, loaded.std) == (CLIP_MEAN, CLIP_STD)  # no preprocessor file: CLIP's own statistics
    proj = load_encoder(f"hf:{folder}#proj").encoder
    assert proj.embed_dim == 12 and proj.depth == 2
    x = _images(seed=2)
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(loaded.encoder(x)[:, 0], pooled)
        image_embeds = full.get_image_features(pixel_values=x)
        image_embeds = image_embeds if torch.is_tensor(image_embeds) else image_embeds.pooler_output
        out = proj(x)
        assert out.shape == (2, 17, 12)
        torch.testing.assert_close(out[:, 0], image_embeds)  # CLIP's image embedding = the projected class token
        torch.testing.assert_close(proj.forward_layers(x, [-1])[0], out)
    with pytest.raises(CheckpointError, match="visual_projection"):  # a tower saved without the projection
        load_encoder(f"hf:{vision_folder}#proj")
    with pytest.raises(CheckpointError, match="not to a mimkit checkpoint"):
        load_encoder(f"{vision_folder}#proj")


def test_hub_names_come_from_the_local_cache_only(clip_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder, tower, _, _ = clip_folders
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"hf:mimkit-test/tiny-clip.*no cached Hugging Face model"):
        load_encoder("hf:mimkit-test/tiny-clip")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mimkit-test--tiny-clip"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_encoder("hf:mimkit-test/tiny-clip")
    assert loaded.mean == PREP["image_mean"]
    x = _images(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x)[:, 0], tower(pixel_values=x).pooler_output)


def test_unsupported_folders_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}.*'bert'"):
        load_encoder(f"hf:{tmp_path}")
    assert is_external_spec("open_clip:ViT-B-16@openai") and not is_external_spec(str(tmp_path))


def test_siglip_and_dinov2_towers(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(image_size=16, **small)).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    # DINOv2 configs name the position table's size (here 32); the processor's crop (16) is the input size
    dino = Dinov2Model(Dinov2Config(image_size=32, mlp_ratio=2, **{k: v for k, v in small.items()
                                                                    if k != "intermediate_size"})).eval()
    dino.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 16, "width": 16}}))
    x = _images(seed=4)
    s = load_encoder(f"hf:{tmp_path / 'siglip'}")
    d = load_encoder(f"hf:{tmp_path / 'dino'}")
    assert (s.mean, s.std) == ([0.5] * 3, [0.5] * 3) and d.img_size == (16, 16) and d.encoder.grid_size == (4, 4)
    with torch.no_grad():
        ref = siglip(pixel_values=x).last_hidden_state  # post_layernorm applied, 16 patches, no class token
        out = s.encoder(x)
        torch.testing.assert_close(out[:, 1:], ref)
        torch.testing.assert_close(out[:, 0], ref.mean(1))  # the mean patch stands in for the class token
        torch.testing.assert_close(d.encoder(x), dino(pixel_values=x).last_hidden_state)
    with pytest.raises(CheckpointError, match="CLIP"):
        load_encoder(f"hf:{tmp_path / 'dino'}#proj")


def test_frozen_teacher_from_a_clip_folder_on_a_grey_student_grid(clip_folders):
    folder, _, full_folder, _ = clip_folders
    images = _images(channels=1, size=28, seed=5)
    teacher = FrozenTeacher.from_config(TeacherConfig(source=f"hf:{folder}", layers=[0, -1]), (7, 7), [0.286], [0.353])
    feats = teacher.features(images)
    assert [f.shape for f in feats] == [(2, 1 + 49, 32)] * 2 and teacher.teacher_grid() == (4, 4)
    # grey data -> the teacher's statistics averaged over its RGB channels (read from preprocessor_config.json)
    torch.testing.assert_close(teacher.shift.flatten(), torch.tensor([(0.286 - 0.2) / 0.5]))
    proj = FrozenTeacher.from_config(TeacherConfig(source=f"hf:{full_folder}#proj", norm="none"), (7, 7), [0.286],
                                     [0.353])
    assert proj.embed_dim == 12 and proj.features(images)[0].shape == (2, 50, 12)
    assert not list(proj.state_dict())  # frozen and outside the method's checkpoint


# ----------------------------------------------------------------------------------------------- open_clip

OC_NAME = "mimkit-test-tiny-clip"
OC_CFG = {"embed_dim": 12,
          "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


class _Payload:
    """An object a weights-only load must refuse to rebuild (rebuilding it would run this class's code)."""

    ran = False

    def __setstate__(self, state):
        _Payload.ran = True


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip", reason="open_clip is optional: pip install 'open_clip_torch>=3'")
    root = tmp_path_factory.mktemp("open_clip")
    (root / "configs").mkdir()
    (root / "configs" / f"{OC_NAME}.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(root / "configs")  # open_clip's mechanism for custom architectures
    torch.manual_seed(0)
    model = open_clip.create_model(OC_NAME).eval()
    with torch.no_grad():  # open_clip leaves some tensors at zero/one: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "tiny.safetensors")
    return root, model


def test_open_clip_tower_matches_open_clip(open_clip_model):
    root, model = open_clip_model
    loaded = load_encoder(f"open_clip:{OC_NAME}@{root / 'tiny.safetensors'}")
    proj = load_encoder(f"open_clip:{OC_NAME}@{root / 'tiny.safetensors'}#proj").encoder
    assert (loaded.img_size, loaded.channels, loaded.mean, loaded.std) == ((16, 16), 3, CLIP_MEAN, CLIP_STD)
    assert (loaded.encoder.depth, loaded.encoder.embed_dim, proj.embed_dim) == (2, 32, 12)
    x = _images(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(proj(x)[:, 0], model.encode_image(x))  # embed + blocks + ln_post + proj
        if hasattr(model.visual, "forward_intermediates"):  # open_clip >= 2.28: its own per-block tokens
            ref = model.visual.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", output_extra_tokens=True,
                                                     intermediates_only=True)
            for mine, spatial, prefix in zip(loaded.encoder.forward_layers(x, [0, 1]), ref["image_intermediates"],
                                             ref["image_intermediates_prefix"]):
                torch.testing.assert_close(mine, torch.cat([prefix, spatial], dim=1))
        grey = x[:, :1]
        torch.testing.assert_close(loaded.encoder(grey), loaded.encoder(grey.expand(-1, 3, -1, -1)))
    teacher = FrozenTeacher.from_config(TeacherConfig(source=f"open_clip:{OC_NAME}@{root / 'tiny.safetensors'}"),
                                        (7, 7), [0.286], [0.353])
    assert teacher.teacher_grid() == (4, 4) and teacher.features(_images(1, 1, 28))[0].shape == (1, 50, 32)


def test_open_clip_weight_files_are_tensors_only(open_clip_model, tmp_path):
    root, model = open_clip_model
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "train.pt")
    x = _images(seed=7)
    with torch.no_grad():  # an open_clip training checkpoint (state_dict + DDP prefix) through torch.load
        torch.testing.assert_close(load_encoder(f"open_clip:{OC_NAME}@{tmp_path / 'train.pt'}#proj").encoder(x)[:, 0],
                                   model.encode_image(x))
    torch.save({"visual.proj": _Payload()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="only tensors"):
        load_encoder(f"open_clip:{OC_NAME}@{tmp_path / 'code.pt'}")
    assert not _Payload.ran
    visual_only = {k: v for k, v in model.visual.state_dict().items() if not k.startswith("transformer.resblocks.1")}
    torch.save(visual_only, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"does not fit.*resblocks\.1"):
        load_encoder(f"open_clip:{OC_NAME}@{tmp_path / 'short.pt'}")


def test_open_clip_local_dir_and_offline_tags(open_clip_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root, model = open_clip_model
    folder = tmp_path / "local"
    folder.mkdir()
    shutil.copy(root / "tiny.safetensors", folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": OC_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    loaded = load_encoder(f"open_clip:local-dir:{folder}")
    assert (loaded.mean, loaded.std) == ([0.5] * 3, [0.25] * 3)
    x = _images(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x)[:, 0] @ model.visual.proj, model.encode_image(x))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # nothing cached: never downloaded
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_encoder("open_clip:ViT-B-16@openai")
    with pytest.raises(CheckpointError, match="neither a weights file nor a pretrained tag"):
        load_encoder("open_clip:ViT-B-16@no_such_tag")
    with pytest.raises(CheckpointError, match="give the weights"):
        load_encoder(f"open_clip:{OC_NAME}")


def test_timm_clip_projection_is_the_models_own_head(tmp_path):
    """`timm:...#proj` keeps timm's CLIP head (the image projection) and applies it to every token."""
    import timm
    from safetensors.torch import save_file

    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=12, **args).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_clip_224", "num_classes": 12, "global_pool": "token", "model_args": args,
        "pretrained_cfg": {"input_size": [3, 16, 16], "fixed_input_size": True, "mean": CLIP_MEAN, "std": CLIP_STD,
                           "num_classes": 12, "first_conv": "patch_embed.proj", "classifier": "head"}}))
    plain = load_encoder(f"timm:local-dir:{tmp_path}")
    proj = load_encoder(f"timm:local-dir:{tmp_path}#proj")
    assert (plain.encoder.embed_dim, proj.encoder.embed_dim, proj.mean) == (32, 12, CLIP_MEAN)
    x = _images(seed=9)
    with torch.no_grad():
        out = proj.encoder(x)
        assert out.shape == (2, 17, 12)
        torch.testing.assert_close(out[:, 0], model.forward_head(model.forward_features(x)))
        torch.testing.assert_close(proj.encoder.forward_layers(x, [-1])[0], out)
        torch.testing.assert_close(plain.encoder(x), model.forward_features(x))
