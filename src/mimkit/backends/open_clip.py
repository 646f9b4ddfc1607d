"""open_clip image towers (`open_clip:<model>@<file or tag>`, `open_clip:local-dir:<folder>`,
`open_clip:hf-hub:<repo>`; optional dependency: `pip install open_clip_torch`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mimkit.backends.attention import open_clip_attention_reader
from mimkit.backends.base import CLIP_MEAN, CLIP_STD, PROJ_SUFFIX, EncoderAdapter, LoadedEncoder, pair
from mimkit.backends.hub import hub_offline, quiet_root_logger, torch_weights
from mimkit.backends.runs import CheckpointError
from mimkit.models.patch import PatchGrid


class OpenClipTower(nn.Module):
    """The image tower of an open_clip CLIP (`model.visual`: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks, ln_post, proj) run block by block, giving [B, 1 + N, D] after each residual block.

    open_clip >= 2.24 runs its blocks batch-first, older versions sequence-first: `transformer.batch_first`
    says which. `grid` (a PatchGrid) tells the frozen teacher its patch grid."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.grid = PatchGrid.make(pair(visual.image_size), pair(visual.patch_size), visual.conv1.in_channels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def forward_layers(self, images: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        x, wanted, found = self.embed(images), set(idx), {}
        seq_first = not getattr(self.visual.transformer, "batch_first", False)
        if seq_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(self.visual.transformer.resblocks[:max(idx) + 1]):
            x = block(x)
            if i in wanted:
                found[i] = x.transpose(0, 1) if seq_first else x
        return [found[i] for i in idx]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post then the image projection, on every token (the pooled path of 'tok' pooling for the class)."""
        return self.visual.ln_post(x) @ self.visual.proj


class OpenClipEncoder(EncoderAdapter):
    """open_clip image tower: [class ; patches] after each block; `forward` applies ln_post to every token
    (and the projection with `project`)."""

    def __init__(self, tower: OpenClipTower, depth, embed_dim, project: bool = False):
        super().__init__(tower, 3, depth, embed_dim)
        self.project = project

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.grid.shape)

    def forward(self, images):
        x = self.model.forward_layers(self._input(images), [self.depth - 1])[0]
        return self.model.head(x) if self.project else self.model.visual.ln_post(x)

    def forward_layers(self, images, layers):
        outs = self.model.forward_layers(self._input(images), self._layer_ids(layers))
        return [self.model.head(x) for x in outs] if self.project else outs

    def attention_readers(self):
        return [open_clip_attention_reader(b.attn, "open_clip") for b in self.model.visual.transformer.resblocks]


def _open_clip_weights(model_name: str, where: str, spec: str) -> tuple[Path, dict]:
    """(weights file, pretrained-tag config) for `<model>@<file or tag>`; a tag's file comes from the HF cache."""
    import open_clip

    path = Path(where).expanduser()
    if path.is_file():
        return path, {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, where) or {}
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise CheckpointError(f"{spec}: {where!r} is neither a weights file nor a pretrained tag of {model_name!r} "
                              f"(tags: {', '.join(tags) or 'none'})")
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise CheckpointError(f"{spec}: tag {where!r} is only downloadable from {tag_cfg.get('url')}; save that file "
                              f"and give open_clip:{model_name}@<file>")
    from huggingface_hub import hf_hub_download

    repo, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=tag_cfg.get("revision"), local_files_only=True)), tag_cfg
        except Exception:  # noqa: BLE001 - not cached: try the next name, then report
            continue
    raise CheckpointError(f"{spec}: the weights of tag {where!r} ({repo}: {' or '.join(names)}) are not in the local "
                          f"Hugging Face cache; fetch them once (e.g. `hf download {repo} {names[0]}`) or "
                          f"give open_clip:{model_name}@<file>")


def load_open_clip(name: str, project: bool = False) -> LoadedEncoder:
    spec = f"open_clip:{name}{PROJ_SUFFIX if project else ''}"
    try:
        import open_clip
    except ImportError as err:
        raise CheckpointError(f"{spec} needs open_clip (pip install 'open_clip_torch>=3.0' or "
                              "pip install 'mimkit[clip]')") from err
    tag_cfg: dict = {}
    weights: Path | None = None
    if name.startswith(("local-dir:", "hf-hub:")):
        model_name = name  # open_clip reads open_clip_config.json; the weights are found below
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):]).expanduser()
        else:
            from huggingface_hub import snapshot_download

            repo = name[len("hf-hub:"):]
            try:
                folder = Path(snapshot_download(repo, local_files_only=True))
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(
                    f"{spec}: {repo!r} is not in the local Hugging Face cache ({type(err).__name__}); fetch it once "
                    f"(`hf download {repo}`) or use open_clip:local-dir:<folder>") from err
            model_name = f"local-dir:{folder}"
        found = [folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                                      "open_clip_pytorch_model.bin", "model.safetensors") if (folder / f).is_file()]
        if not (folder / "open_clip_config.json").is_file() or not found:
            raise CheckpointError(f"{spec}: {folder} needs open_clip_config.json and open_clip_model.safetensors "
                                  "(or open_clip_pytorch_model.bin)")
        weights = found[0]
    elif "@" in name:
        model_name, where = name.split("@", 1)
        weights, tag_cfg = _open_clip_weights(model_name, where, spec)
    else:
        raise CheckpointError(f"{spec}: give the weights: open_clip:{name}@<file or pretrained tag>, "
                              "open_clip:local-dir:<folder> or open_clip:hf-hub:<repo>")
    state = torch_weights(weights, spec)  # read before building the model: a bad file fails fast
    try:
        # open_clip logs "no pretrained weights loaded" for a model whose weights are loaded just below
        with hub_offline(), quiet_root_logger():
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False, pretrained_text=False,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    except Exception as err:  # noqa: BLE001 - unknown model names, bad configs
        raise CheckpointError(f"{spec}: open_clip cannot build {model_name!r} ({type(err).__name__}: {err}); "
                              f"known models: open_clip.list_models()") from err
    visual = model.visual
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer")):
        raise CheckpointError(f"{spec}: the image tower is a {type(visual).__name__}; open_clip: reads open_clip's "
                              "own VisionTransformer (timm-trunk models: use timm:<name> instead)")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{spec}: {weights} does not fit {model_name!r}'s image tower (missing "
                              f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    if project and (visual.proj is None or getattr(visual, "attn_pool", None) is not None):
        raise CheckpointError(f"{spec}: this image tower has no plain token projection; drop {PROJ_SUFFIX}")
    pre = open_clip.get_model_preprocess_cfg(model) or {}
    mean = list(tag_cfg.get("mean") or pre.get("mean") or CLIP_MEAN)
    std = list(tag_cfg.get("std") or pre.get("std") or CLIP_STD)
    tower = OpenClipTower(visual.eval())
    width = visual.proj.shape[1] if project else visual.transformer.width
    enc = OpenClipEncoder(tower, len(visual.transformer.resblocks), int(width), project)
    return LoadedEncoder(enc, tuple(tower.grid.img_size), 3, mean[:3], std[:3])
