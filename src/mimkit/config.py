"""Typed run configuration: pydantic models loaded from YAML recipes with `key.sub=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the field and what is allowed
instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator,
)

from mimkit.catalog import method_config_class  # noqa: F401 - also `mimkit.config.method_config_class`
from mimkit.config_errors import ConfigError, format_errors


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ImageSize = Union[int, tuple[int, int]]
DepthFraction = Annotated[float, Field(gt=0.0, le=1.0)]  # a layer as a share of the encoder depth (models.vit.block_at)


class DataConfig(Section):
    source: Literal["fashion_mnist", "folder", "imagefolder", "torchvision", "shards", "hf"] = "fashion_mnist"
    path: str | None = Field(None, description="folder root (folder, imagefolder), download root (torchvision), "
                             "the folder of WebDataset-style .tar shards written by `mimkit data shard` (shards), "
                             "or (hf) a folder written by datasets' save_to_disk, or of data files (parquet, images)")
    name: str | None = Field(None, description="torchvision dataset class name, e.g. CIFAR10; for source=hf a "
                             "Hugging Face dataset (e.g. cifar10) or a packaged builder over data.path (parquet, "
                             "imagefolder)")
    hf_config: str | None = Field(None, description="hf: the dataset's configuration (subset) name")
    hf_split: str = Field("train", min_length=1, description="hf: the split pretraining uses")
    hf_test_split: str | None = Field(None, description="hf: the split kNN evaluation queries; unset: the held-out "
                                      "data.val_fraction of hf_split, as for folders")
    hf_image_key: str | None = Field(None, description="hf: the image column (default: the first Image column, "
                                     "else image/img)")
    hf_label_key: str | None = Field(None, description="hf: the label column (default: label, if present)")
    hf_streaming: bool = Field(False, description="hf: read the split as a stream (IterableDataset), each rank "
                               "its own part, instead of by random access")
    hf_split_by: Literal["examples", "shards"] = Field(
        "examples", description="hf streaming: deal examples round robin to the ranks (every rank reads the "
        "stream) or whole shards (each rank reads only its files; shards must be of equal size)")
    hf_shuffle_buffer: int = Field(1000, ge=0, description="hf streaming: shuffle buffer size (0: stream order)")
    download: bool = False
    img_size: ImageSize = 28
    channels: int | None = Field(None, ge=1, description="input channels; inferred from the data when unset")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="held-out share for the fixed-mask MIM val loss")
    split_seed: int = 0
    limit: int | None = Field(None, ge=1, description="use N training images: a fixed seeded subset taken after the val split (quick runs)")
    mean: list[float] | None = None
    std: list[float] | None = None
    stats_samples: int = Field(2000, ge=1, description="images sampled to compute mean/std when not given")
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    on_error: Literal["error", "skip"] = Field("error", description="unreadable image: stop, or skip and report")
    num_workers: int = Field(2, ge=0)
    pin_memory: bool = False

    @field_validator("crop_scale")
    @classmethod
    def _scale_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"need 0 < min <= max <= 1, got {v}")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _ratio_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"need 0 < min <= max (aspect ratios w/h), got {v}")
        return v

    @field_validator("img_size")
    @classmethod
    def _size_ok(cls, v):
        if (v if isinstance(v, int) else min(v)) < 1:
            raise ValueError(f"image size must be positive, got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _std_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not s > 0 for s in v):
            raise ValueError(f"every std must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _source_args(self) -> "DataConfig":
        if self.source in ("folder", "imagefolder", "shards") and not self.path:
            raise ValueError(f"data.path is required for source={self.source!r}")
        if self.source == "hf" and not (self.name or self.path):
            raise ValueError("source='hf' needs data.name (a Hugging Face dataset, or a builder such as parquet) "
                             "or data.path (a folder written by save_to_disk, or of data files)")
        if self.source != "hf":
            set_hf = [k for k in ("hf_config", "hf_test_split", "hf_image_key", "hf_label_key")
                      if getattr(self, k) is not None] + (["hf_streaming"] if self.hf_streaming else [])
            if set_hf:
                raise ValueError(f"data.{set_hf[0]} applies to source='hf' only (source is {self.source!r})")
        if self.source == "torchvision" and not self.name:
            raise ValueError("data.name (e.g. CIFAR10) is required for source='torchvision'")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither (then they are computed)")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}")
        if self.mean is not None and self.channels is not None and len(self.mean) != self.channels:
            raise ValueError(f"data.mean/data.std have {len(self.mean)} values but data.channels={self.channels}")
        return self


class ModelConfig(Section):
    encoder: Literal["vit_nano", "vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "resnet18", "resnet50"] = Field(
        "vit_tiny", description="ViT preset (width x depth: vit_nano 96x6, vit_micro 128x6, vit_tiny 192x12, "
        "vit_small 384x12, ...), or a timm ResNet for the methods that accept a CNN (a2mim)"
    )
    patch_size: int = Field(4, ge=1, description="ViT patch size; for a CNN, the mask-unit size in pixels")
    depth: int | None = Field(None, ge=1, description="override the preset's number of blocks (quick runs, tests)")
    embed_dim: int | None = Field(None, ge=8, description="override the preset's width (ViT encoders)")
    num_heads: int | None = Field(None, ge=1, description="override the preset's attention heads (ViT encoders; "
                                  "must divide the width)")
    grad_checkpointing: bool = Field(False, description="recompute encoder blocks in the backward pass instead of "
                                     "keeping their activations (less memory, about a third more compute)")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    decoder: Literal["tiny", "small", "base", "mae"] = Field(
        "tiny", description="decoder preset (depth x width): tiny 2x128, small 4x256, base = mae 8x512 (MAE's own)"
    )
    decoder_depth: int | None = Field(None, ge=1)
    decoder_dim: int | None = Field(None, ge=8)
    decoder_heads: int | None = Field(None, ge=1)


class MethodSection(Section):
    """Base of every method's settings. Each method file defines its own subclass (with `name` a Literal of
    the method's name) next to the method; `PretrainConfig.method` picks the subclass by `name`."""

    name: str

    @model_validator(mode="before")
    @classmethod
    def _partial_nested(cls, data):
        """`method.teacher.start=0.99` alone arrives as {"teacher": {"start": 0.99}}: a dict given for a field whose
        default is a model (an EMASchedule, a TeacherConfig) updates that default instead of replacing it, so
        the method's other defaults for it (e.g. a linear schedule's kind) stay."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or not isinstance(value, dict):
                continue
            if field.default_factory is not None:
                default = field.default_factory()
            else:
                default = field.default
            if isinstance(default, BaseModel):
                out[key] = {**default.model_dump(), **value}
        return out


def _default_method() -> MethodSection:
    return method_config_class("mae")()


class OptimConfig(Section):
    batch_size: int = Field(256, ge=1, description="global batch per optimizer step (all devices, all accumulation)")
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps per optimizer step")
    # defaults are the demo's short CPU run; MAE's ImageNet values (1.5e-4, 800 epochs) are in configs/
    base_lr: float = Field(1.5e-3, gt=0.0, description="lr = base_lr * batch_size / 256")
    lr: float | None = Field(None, gt=0.0, description="absolute lr; overrides base_lr when set")
    min_lr: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = Field(1, gt=0, description="training length in epochs (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="run length in optimizer steps; overrides epochs when set")
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of steps with linear lr warmup")
    clip_grad: float | None = Field(None, gt=0.0)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


class TrainerConfig(Section):
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "fsdp", "ddp_spawn"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_epochs: int | None = Field(1, ge=1)
    keep_epoch_checkpoints: bool = Field(False, description="also keep checkpoints/epoch_NNNN.ckpt at epoch checkpoints")
    stop_after_steps: int | None = Field(
        None, ge=1, description="end the run early after this many optimizer steps (checkpointed, resumable); "
        "the lr schedule still spans the full run"
    )
    log_every_steps: int = Field(10, ge=1)
    progress: bool = True
    compile: bool = Field(False, description="torch.compile the method's forward (first steps are slower)")
    nan_retries: int = Field(0, ge=0, description="on a NaN/inf loss, roll back to the last good checkpoint, lower "
                             "the lr and continue, at most this many times (0: stop with an error)")
    nan_lr_factor: float = Field(0.5, gt=0.0, lt=1.0, description="lr multiplier applied at each NaN rollback")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_alias(cls, v: Any) -> Any:
        aliases = {"32": "32-true", 32: "32-true", "fp32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed"}
        return aliases.get(v, v) if isinstance(v, (str, int)) else v


class EvalConfig(Section):
    knn: bool = True
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    knn_limit: int | None = Field(
        10000, ge=1, description="kNN uses the first N train images as the bank and the first N test images as "
        "queries (null = all); 10k keeps the demo's figure to about a minute on 2 CPU cores"
    )
    visualize: bool = True
    num_images: int = Field(8, ge=1)
    recon_every_epochs: int = Field(1, ge=0, description="save <run>/recon/step_NNNNNN.png every N epochs (0: never)")
    # `mimkit eval --protocol ...` (linear / attentive / finetune / fewshot / layers); see mimkit.eval.protocols
    pool: Literal["cls", "mean"] = Field("cls", description="image feature: class token or mean patch token")
    layers: list[int] | None = Field(None, description="kNN/linear features from these blocks (concatenated); "
                                     "for the layers protocol, the blocks probed (default all)")
    batch_size: int = Field(256, ge=1, description="images per forward pass when extracting features")
    train_limit: int | None = Field(None, ge=1, description="cap on training images for probes (a seeded subset)")
    test_limit: int | None = Field(None, ge=1, description="cap on test images (the first ones)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of the training images held out to choose "
                                "probe settings; the test split never chooses anything")
    seed: int = 0
    linear_lrs: list[float] = Field([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], min_length=1)
    linear_epochs: int = Field(30, ge=1)
    linear_weight_decay: float = Field(0.0, ge=0.0)
    attentive_epochs: int = Field(10, ge=1)
    attentive_lr: float = Field(1e-3, gt=0.0)
    attentive_heads: int = Field(8, ge=1, description="heads of the cross-attention pooler")
    ep_queries: int = Field(32, ge=1, description="queries of Efficient Probing")
    attentive_train_limit: int | None = Field(10000, ge=1, description="training images whose tokens are cached")
    finetune_epochs: int = Field(5, ge=1)
    finetune_max_steps: int | None = Field(None, ge=1)
    finetune_batch_size: int = Field(128, ge=2)
    finetune_blr: float = Field(1e-3, gt=0.0, description="lr = blr * batch / 256")
    finetune_weight_decay: float = Field(0.05, ge=0.0)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.8, ge=0.0)
    cutmix: float = Field(1.0, ge=0.0)
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    from_scratch: bool = Field(False, description="fine-tune the same architecture from random initialisation")
    compare_scratch: bool = Field(False, description="fine-tune from the weights and from scratch, side by side")
    fewshot_shots: list[int] = Field([1, 5, 10], min_length=1)
    fewshot_seeds: int = Field(5, ge=1)
    fewshot_classifier: Literal["logreg", "centroid"] = "logreg"
    layers_epochs: int = Field(10, ge=1)


class PretrainConfig(Section):
    method: SerializeAsAny[MethodSection] = Field(default_factory=_default_method)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("method", mode="wrap")
    @classmethod
    def _method_by_name(cls, value: Any, handler) -> MethodSection:
        # the method's own settings class validates the section, so errors name e.g. method.mask_ratio
        if isinstance(value, MethodSection):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"the method section must be a mapping with a `name`, got {value!r}")
        return method_config_class(value.get("name", "mae")).model_validate(value)


# ----------------------------------------------------------------------------------------------------------
# loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (['optim', 'lr'], 0.001); the value is read as YAML (numbers, lists, null, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def build_config(model: type[BaseModel], tree: dict) -> BaseModel:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, model, tree if isinstance(tree, dict) else None)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    model: type[BaseModel] = PretrainConfig, base: dict | None = None,
):
    """Read a YAML recipe (or start from `base`, a plain config tree), apply `key=value` overrides, validate.

    Raises ConfigError naming the field.
    """
    tree: dict = copy.deepcopy(base) if base and path is None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["method"] and isinstance(value, str):
            # `method=<name>` switches method: the old method's settings do not apply to the new one
            value = {"name": value}
        _set(tree, keys, value)
    return build_config(model, tree)


def apply_overrides(cfg: BaseModel, overrides, sections: tuple[str, ...] = ("data", "eval")) -> BaseModel:
    """A copy of `cfg` with `key=value` overrides applied, allowing only the named sections (e.g. to evaluate
    a checkpoint on other data without touching the architecture it was trained with)."""
    if not overrides:
        return cfg
    tree = cfg.model_dump(mode="json")
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in sections:
            allowed = " and ".join(f"{s}.*" for s in sections)
            raise ConfigError(f"only {allowed} can be overridden here, not {item!r}")
        _set(tree, keys, value)
    return build_config(type(cfg), tree)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
