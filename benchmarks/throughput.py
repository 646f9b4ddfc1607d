"""MAE pretraining throughput: mimkit vs Hugging Face transformers' ViTMAEForPreTraining (and lightly's MAE).

One training step = forward + backward + AdamW step on a fresh random batch-sized input, with each
implementation doing its own random masking (ratio 0.75) and norm_pix loss. All implementations share
the architecture (encoder/decoder widths, depths, heads, MLP ratio 4, LayerNorm eps 1e-6, qkv bias), the
batch size, the optimizer settings and the precision. They are timed interleaved in one process: after
warmup, each round runs `--steps` steps of every implementation in turn (the order alternates between
rounds), and the reported figure is the median over rounds, so machine noise hits all of them alike. Also reported: the median over rounds of the
per-round ratio (paired), and rates per CPU second of this process (robust to time-slicing on a shared
machine; meaningful with --threads 1).

    python benchmarks/throughput.py --device cpu --configs tiny32,base224 --precisions fp32,bf16 \
        --json bench.json

--compile adds a torch.compile(mimkit) row, --grad-ckpt a row with the encoder's activation checkpointing
(`encoder.set_grad_checkpointing()`), --memory the peak memory of one training step of every row (CUDA:
torch.cuda.max_memory_allocated, everything allocated; CPU: `PeakMemory`, tensor storage alive at the peak
above the weights and optimizer state that exist before the step: activations, gradients, temporaries).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BenchConfig:
    name: str
    img_size: int
    patch_size: int
    in_chans: int
    encoder: str        # mimkit preset
    embed_dim: int
    depth: int
    num_heads: int
    decoder: str        # mimkit decoder preset
    dec_dim: int
    dec_depth: int
    dec_heads: int
    batch_cpu: int
    batch_cuda: int


CONFIGS = {
    "tiny32": BenchConfig("ViT-Tiny/4 @32, dec 4x256", 32, 4, 3, "vit_tiny", 192, 12, 3, "small", 256, 4, 8, 64, 256),
    "base224": BenchConfig("ViT-Base/16 @224, dec 8x512", 224, 16, 3, "vit_base", 768, 12, 12, "mae", 512, 8, 16, 8, 128),
}
MASK_RATIO = 0.75


def norm_pix(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


# ----------------------------------------------------------------------------------------------- builders
# Each builder returns (model, step_loss) where step_loss(images) -> scalar loss.

def build_mimkit(cfg: BenchConfig, compile_model: bool = False, grad_ckpt: bool = False):
    from mimkit.methods.mae import MAE
    from mimkit.models import MAEDecoder, VisionTransformer

    enc = VisionTransformer.from_preset(cfg.encoder, cfg.img_size, cfg.patch_size, cfg.in_chans,
                                        grad_checkpointing=grad_ckpt)
    dec = MAEDecoder(enc.grid.shape, enc.embed_dim, enc.grid.patch_dim, dim=cfg.dec_dim, depth=cfg.dec_depth,
                     num_heads=cfg.dec_heads)
    model = MAE(enc, dec, MASK_RATIO, norm_pix=True)
    counter = [0]
    fwd = torch.compile(model) if compile_model else model

    def loss_fn(images):
        b = images.shape[0]
        seeds = torch.arange(counter[0], counter[0] + b, device=images.device)
        counter[0] += b
        return fwd({"image": images, "seed": seeds})["loss"]

    return model, loss_fn


def build_hf(cfg: BenchConfig, attn: str = "sdpa"):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hc = ViTMAEConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.embed_dim, decoder_hidden_size=cfg.dec_dim,
        decoder_num_hidden_layers=cfg.dec_depth, decoder_num_attention_heads=cfg.dec_heads,
        decoder_intermediate_size=4 * cfg.dec_dim, mask_ratio=MASK_RATIO, norm_pix_loss=True,
        layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hc._attn_implementation = attn
    model = ViTMAEForPreTraining(hc)
    model.config._attn_implementation = attn

    def loss_fn(images):
        return model(pixel_values=images).loss

    return model, loss_fn


def build_lightly(cfg: BenchConfig):
    """lightly's MAE building blocks (MaskedVisionTransformerTIMM + MAEDecoderTIMM on a timm ViT), wired as in
    lightly's MAE example; the decoder head predicts the masked tokens only (their design). Target: norm_pix."""
    import timm
    from lightly.models import utils as lu
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
    )
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim, decoder_embed_dim=cfg.dec_dim, decoder_depth=cfg.dec_depth,
            decoder_num_heads=cfg.dec_heads, mlp_ratio=4.0,
        )
    model = nn.ModuleDict({"backbone": backbone, "decoder": decoder})
    seq_len = backbone.sequence_length

    def loss_fn(images):
        b = images.shape[0]
        idx_keep, idx_mask = lu.random_token_mask((b, seq_len), mask_ratio=MASK_RATIO, device=images.device)
        latent = backbone.encode(images=images, idx_keep=idx_keep)
        tokens = decoder.embed(latent)
        full = lu.repeat_token(decoder.mask_token, (b, seq_len))
        full = lu.set_at_index(full, idx_keep, tokens.type_as(full))
        pred = decoder.predict(lu.get_at_index(decoder.decode(full), idx_mask))
        target = lu.get_at_index(norm_pix(lu.patchify(images, cfg.patch_size)), idx_mask - 1)
        return F.mse_loss(pred.float(), target.float())

    return model, loss_fn


# ------------------------------------------------------------------------------------------------ timing

class Runner:
    def __init__(self, name, model, loss_fn, device, bf16, batch, cfg):
        self.name, self.model, self.loss_fn, self.device, self.bf16 = name, model.to(device).train(), loss_fn, device, bf16
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4,
                                     betas=(0.9, 0.95), weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
        self.rates: list[float] = []      # images / wall-clock second, per round
        self.cpu_rates: list[float] = []  # images / CPU second of this process, per round
        self.params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.peak_mib: float | None = None

    def measure_memory(self):
        """Peak memory (MiB) of one training step, after warmup (optimizer state already allocated)."""
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            sync(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        with PeakMemory() as tracker:
            self.step()
        self.peak_mib = tracker.peak / 2**20

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.images)
        loss.backward()
        self.opt.step()
        return loss

    def timed(self, steps):
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss = self.step()
        sync(self.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss")
        self.rates.append(steps * self.images.shape[0] / dt)
        self.cpu_rates.append(steps * self.images.shape[0] / max(dc, 1e-9))


class PeakMemory:
    """Peak bytes of tensor storage allocated inside the block and alive at once (any device; exact at op
    boundaries): every op's outputs are seen through a TorchDispatchMode, and storages are dropped from the
    count once freed. What existed before (weights, optimizer state) is not counted."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.live = {k: v for k, v in tracker.live.items() if not v[0].expired()}
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = (t.device, st.data_ptr())
                        old = tracker.before.get(key)  # memory of a tensor from before, unless freed since
                        if st.nbytes() and key not in tracker.live and (old is None or old.expired()):
                            tracker.live[key] = (StorageWeakRef(st), st.nbytes())
                tracker.peak = max(tracker.peak, sum(n for _, n in tracker.live.values()))
                return out

        self.mode, self.live, self.before, self.peak = Mode(), {}, {}, 0
        self.weak_ref = StorageWeakRef

    def __enter__(self):
        import gc

        gc.collect()
        with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
            warnings.simplefilter("ignore")
            tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
        self.before = {(t.device, t.untyped_storage().data_ptr()): self.weak_ref(t.untyped_storage())
                       for t in tensors}
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg, device, precision, batch, steps, rounds, warmup, peers, compile_model, grad_ckpt=False,
          memory=False):
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    runners = [Runner("mimkit", *build_mimkit(cfg), device, bf16, batch, cfg)]
    if compile_model:
        runners.append(Runner("mimkit+compile", *build_mimkit(cfg, compile_model=True), device, bf16, batch, cfg))
    if grad_ckpt:
        runners.append(Runner("mimkit+ckpt", *build_mimkit(cfg, grad_ckpt=True), device, bf16, batch, cfg))
    if "hf" in peers:
        runners.append(Runner("hf", *build_hf(cfg, "sdpa"), device, bf16, batch, cfg))
    if "hf-eager" in peers:
        runners.append(Runner("hf-eager", *build_hf(cfg, "eager"), device, bf16, batch, cfg))
    if "lightly" in peers:
        try:
            runners.append(Runner("lightly", *build_lightly(cfg), device, bf16, batch, cfg))
        except ImportError as e:
            print(f"  (lightly unavailable: {e})", file=sys.stderr)
    for r in runners:
        for _ in range(warmup):
            r.step()
        if memory:
            r.measure_memory()
    for i in range(rounds):
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            r.timed(steps)
    med = {r.name: statistics.median(r.rates) for r in runners}
    cpu_med = {r.name: statistics.median(r.cpu_rates) for r in runners}
    ref = runners[0]
    return [
        dict(config=cfg.name, key=key_of(cfg), precision=precision, batch=batch, impl=r.name, params=r.params,
             images_per_s=med[r.name], best_images_per_s=max(r.rates), rounds=[round(x, 3) for x in r.rates],
             images_per_cpu_s=cpu_med[r.name], cpu_rounds=[round(x, 3) for x in r.cpu_rates],
             ratio_mimkit_over_this=med["mimkit"] / med[r.name],
             # the same round's mimkit rate over this one's, median over rounds: robust to slow drifts in load
             paired_ratio=statistics.median(a / b for a, b in zip(ref.rates, r.rates)),
             cpu_ratio=cpu_med["mimkit"] / cpu_med[r.name], peak_mib=r.peak_mib)
        for r in runners
    ]


def key_of(cfg):
    return next(k for k, v in CONFIGS.items() if v is cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="tiny32,base224", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (torch.autocast)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="batch for every config (default: per config, smaller on CPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    ap.add_argument("--peers", default="hf,lightly", help="comma list of hf, hf-eager, lightly")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(mimkit) (a separate row)")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="also time mimkit with activation checkpointing of the encoder blocks (a separate row)")
    ap.add_argument("--memory", action="store_true", help="also measure each row's peak memory of one step")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peers = [p for p in args.peers.split(",") if p]
    import transformers
    info = dict(
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        machine=platform.machine(), processor=cpu_name(), threads=torch.get_num_threads(), device=str(device),
        cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        hf_attn_implementation="sdpa", timm_fused_attn=timm_fused(), argv=sys.argv[1:],
    )
    try:
        import lightly
        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    print(" ".join(f"{k}={v}" for k, v in info.items() if k != "argv"))
    results = []
    for key in args.configs.split(","):
        cfg = CONFIGS[key]
        for precision in args.precisions.split(","):
            batch = args.batch_size or (cfg.batch_cuda if device.type == "cuda" else cfg.batch_cpu)
            rows = bench(cfg, device, precision, batch, args.steps, args.rounds, args.warmup, peers, args.compile,
                         args.grad_ckpt, args.memory)
            results += rows
            print_rows(rows)
    print()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


def print_rows(rows):
    for r in rows:
        mem = f"  peak {r['peak_mib']:.1f} MiB" if r.get("peak_mib") is not None else ""
        print(f"  {r['key']:8s} {r['precision']:5s} b={r['batch']:<4d} {r['impl']:15s} {r['images_per_s']:9.2f} img/s  "
              f"{r['images_per_cpu_s']:9.2f} img/cpu-s{mem}  rounds={r['rounds']}", flush=True)


def print_table(results):
    mem = any(r.get("peak_mib") is not None for r in results)
    print("| config | precision | batch | implementation | images/s (median) | mimkit / this | paired ratio "
          "| images/CPU-s | mimkit / this (CPU time) |" + (" peak MiB |" if mem else ""))
    print("|---|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if mem else ""))
    for r in results:
        peak = "" if not mem else (f" {r['peak_mib']:.1f} |" if r.get("peak_mib") is not None else " |")
        print(f"| {r['config']} | {r['precision']} | {r['batch']} | {r['impl']} | {r['images_per_s']:.2f} | "
              f"{r['ratio_mimkit_over_this']:.2f}x | {r['paired_ratio']:.2f}x | {r['images_per_cpu_s']:.2f} | "
              f"{r['cpu_ratio']:.2f}x |" + peak)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timm_fused():
    try:
        from timm.layers import use_fused_attn
        return use_fused_attn()
    except ImportError:
        return None


if __name__ == "__main__":
    main()
