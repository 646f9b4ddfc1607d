"""The run configuration's sections: pydantic models, one per recipe section (loading is in config.loading).

Every section forbids unknown keys, so a typo is an error that names the field and what is allowed
instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from mimkit.catalog import method_config_class


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ImageSize = Union[int, tuple[int, int]]
DepthFraction = Annotated[float, Field(gt=0.0, le=1.0)]  # a layer as a share of the encoder depth (models.vit.block_at)


class DataConfig(Section):
    source: Literal["fashion_mnist", "idx", "folder", "imagefolder", "torchvision", "shards", "hf"] = "fashion_mnist"
    path: str | None = Field(None, description="folder root (folder, imagefolder), the folder of IDX files (idx: "
                             "MNIST, KMNIST, EMNIST, ...), download root (torchvision), "
                             "the folder of WebDataset-style .tar shards written by `mimkit data shard` (shards), "
                             "or (hf) a folder written by datasets' save_to_disk, or of data files (parquet, images)")
    name: str | None = Field(None, description="torchvision dataset class name, e.g. CIFAR10; for source=idx the "
                             "dataset's name, which also picks its files when the folder holds several (EMNIST); "
                             "for source=hf a "
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
    val_limit: int | None = Field(None, ge=1, description="score the val loss on the first N held-out images (a fixed seeded "
                                  "subset); unset: all of them, or at most data.limit when that is set")
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
        if self.source in ("folder", "imagefolder", "shards", "idx") and not self.path:
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
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay (of the start, with weight_decay_end)")
    weight_decay_end: float | None = Field(
        None, ge=0.0, description="cosine weight-decay schedule from weight_decay to this over training, as "
        "DINO/iBOT (0.04 -> 0.4); null: constant weight_decay")
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
    devices: int | list[int] | Literal["auto"] = Field(
        1, description="how many devices (a count), or which GPUs (a list of indices, e.g. [1] or [0, 2]; "
        "CUDA only), or auto; passed to Lightning Fabric")
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
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["csv", "tensorboard"], description="where metrics go: csv (<run>/metrics.csv), "
        "tensorboard (<run>/tensorboard), wandb, mlflow (these two need their package installed)")
    progress: bool = True
    compile: bool = Field(False, description="torch.compile the method's forward (first steps are slower)")
    nan_retries: int = Field(0, ge=0, description="on a NaN/inf loss, roll back to the last good checkpoint, lower "
                             "the lr and continue, at most this many times (0: stop with an error)")
    nan_lr_factor: float = Field(0.5, gt=0.0, lt=1.0, description="lr multiplier applied at each NaN rollback")

    @field_validator("devices")
    @classmethod
    def _devices_ok(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a device count must be >= 1, got {v}")
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list of GPU indices selects no device")
            if any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError(f"GPU indices must be distinct and >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _device_list_needs_gpus(self) -> "TrainerConfig":
        if isinstance(self.devices, list) and self.accelerator in ("cpu", "mps"):
            raise ValueError(f"trainer.devices={self.devices} lists GPU indices, which trainer.accelerator="
                             f"{self.accelerator!r} cannot use; give a count (e.g. trainer.devices=1)")
        return self

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
    online_probe_every_steps: int | None = Field(
        None, ge=1, description="during pretraining, every N steps: kNN and linear-probe accuracy on a fixed "
        "labelled subset of the held-out validation images (logged as online_knn / online_linear; null: off)")
    online_probe_images: int = Field(2000, ge=4, description="held-out images the online probe uses (half bank/"
                                     "train, half queries/test)")
    baseline_table: bool = Field(False, description="end `mimkit pretrain` with eval.label_cells for the run's "
                                 "encoder, the same architecture at random init, and raw pixels")
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
    # fine-tuning: None takes eval.finetune_recipe's value (mimkit.eval.finetune.RECIPES)
    finetune_recipe: Literal["small", "imagenet"] = Field(
        "small", description="small: regularisation for a few CPU minutes (chosen on a validation split of "
        "the training images, benchmarks/finetune_search.py); imagenet: MAE's (mixup 0.8, cutmix 1.0)")
    finetune_epochs: float | None = Field(None, gt=0)
    finetune_max_steps: int | None = Field(None, ge=0, description="cap on optimizer steps (0: no cap)")
    finetune_batch_size: int | None = Field(None, ge=2)
    finetune_blrs: list[float] | None = Field(None, min_length=1, description="base lrs (lr = blr * batch / 256); "
                                              "with more than one, the best on the validation split is kept")
    finetune_weight_decay: float | None = Field(None, ge=0.0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    drop_path: float | None = Field(None, ge=0.0, lt=1.0)
    mixup: float | None = Field(None, ge=0.0)
    cutmix: float | None = Field(None, ge=0.0)
    smoothing: float | None = Field(None, ge=0.0, lt=1.0)
    finetune_shift: int | None = Field(None, ge=0, description="random translation by up to N pixels")
    from_scratch: bool = Field(False, description="fine-tune the same architecture from random initialisation")
    compare_scratch: bool = Field(False, description="fine-tune from the weights and from scratch, side by side")
    fewshot_shots: list[int] = Field([1, 5, 10], min_length=1)
    fewshot_seeds: int = Field(5, ge=1)
    fewshot_classifier: Literal["logreg", "centroid"] = "logreg"
    layers_epochs: int = Field(10, ge=1)
    label_cells: list[str] = Field(
        ["knn@1", "linear@0.01", "linear@0.1", "linear@1", "finetune@0.01", "finetune@0.1", "finetune@1"],
        min_length=1, description="labels / baselines protocols: protocol@fraction cells (knn, linear, finetune; "
        "fraction of the training labels, class-balanced, nested, seeded by eval.seed)")

    @field_validator("label_cells")
    @classmethod
    def _cells(cls, cells: list[str]) -> list[str]:
        for cell in cells:
            protocol, _, fraction = cell.partition("@")
            try:
                ok = protocol in ("knn", "linear", "finetune") and 0 < float(fraction) <= 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{cell!r} is not protocol@fraction (knn, linear or finetune; a fraction in (0, 1], "
                                 "e.g. linear@0.01)")
        return cells

    @model_validator(mode="before")
    @classmethod
    def _pre_recipe_settings(cls, data):
        """Settings stored before fine-tuning recipes existed (they have eval.finetune_blr): the fine-tuning
        fields still at that version's defaults were defaults, not choices, so they now follow the recipe."""
        if not isinstance(data, dict) or "finetune_blr" not in data:
            return data
        data = dict(data)
        blr = data.pop("finetune_blr")
        if blr != _PRE_RECIPE_DEFAULTS["finetune_blr"] and data.get("finetune_blrs") is None:
            data["finetune_blrs"] = [blr]
        for key, default in _PRE_RECIPE_DEFAULTS.items():
            if key in data and data[key] == default:
                data[key] = None
        return data


# eval.* fine-tuning defaults before eval.finetune_recipe (MAE's ImageNet values at 5 epochs)
_PRE_RECIPE_DEFAULTS = {"finetune_epochs": 5, "finetune_batch_size": 128, "finetune_blr": 1e-3,
                        "finetune_weight_decay": 0.05, "layer_decay": 0.75, "drop_path": 0.1, "mixup": 0.8,
                        "cutmix": 1.0, "smoothing": 0.1}


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

    @field_validator("model")
    @classmethod
    def _patches_tile_the_image(cls, model: ModelConfig, info) -> ModelConfig:
        data = info.data.get("data")  # validated before `model` (field order); absent if it was invalid
        if data is None:
            return model
        size = data.img_size
        h, w = (size, size) if isinstance(size, int) else size
        p = model.patch_size
        if h % p or w % p:
            what = "mask-unit" if model.encoder.startswith("resnet") else "patch"
            fits = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
            choose = f"choose a patch size among {fits}" if fits else "no patch size above 1 divides both sides; choose"
            raise ValueError(f"model.patch_size={p} does not divide data.img_size={size!r}: the {what} grid must "
                             f"tile the image exactly; {choose} or another data.img_size")
        return model
