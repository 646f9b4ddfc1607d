"""`mimkit tokenizer fit`: `mimkit pretrain` with method=vqkd (the CLI runs that command), then the codebook usage
of the trained tokenizer. A module of its own, above the engine and methods, so that methods/vqkd.py (the method)
never reaches into the command line.
"""

from __future__ import annotations

from pathlib import Path


def vqkd_overrides(config: str | None, overrides: list[str]) -> list[str]:
    """The overrides with `method=vqkd` first unless the recipe or an override already names vqkd."""
    from mimkit.config import ConfigError, load_config, parse_override

    named = [v for k, v in map(parse_override, overrides) if k == ["method"]]
    if named:
        if named[-1] != "vqkd":
            raise ConfigError(f"`mimkit tokenizer fit` trains method=vqkd, not method={named[-1]}")
        return overrides
    if config is not None and load_config(config, []).method.name == "vqkd":
        return overrides
    return ["method=vqkd", *overrides]


def _run_dir_after(cfg, resume: str | None, started: float) -> Path:
    """The folder the run just trained into (the engine names it; found the way it names or resumes it)."""
    from mimkit.config import ConfigError
    from mimkit.engine.checkpoint import find_checkpoint, run_dir_of
    from mimkit.engine.trainer import default_run_prefix

    out = Path(cfg.trainer.out_dir)
    if cfg.trainer.run_name:
        return out / cfg.trainer.run_name
    if resume and resume != "auto":
        return run_dir_of(find_checkpoint(resume))
    found = [p.parent for p in out.glob(default_run_prefix(cfg) + "*/results.json") if p.stat().st_mtime >= started]
    if not found:
        raise ConfigError(f"cannot find the run folder of this tokenizer under {out}: pass trainer.run_name")
    return max(found, key=lambda p: (p / "results.json").stat().st_mtime)


def record_codebook_usage(config: str | None, overrides: list[str], resume: str | None, started: float) -> dict:
    """After `mimkit pretrain` with method=vqkd: the codebook usage of the run just trained, over its validation
    split (the training split when there is none), printed and added to the run's results.json."""
    import json

    import torch

    from mimkit.config import load_config
    from mimkit.data import build_pretrain_data
    from mimkit.engine.checkpoint import method_from_checkpoint
    from mimkit.methods.vqkd import codebook_usage
    from mimkit.pipeline import write_json

    run_dir = _run_dir_after(load_config(config, overrides), resume, started)
    method, cfg, _ = method_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    data = build_pretrain_data(cfg.data)
    split, dataset = ("validation", data.val) if data.val is not None and len(data.val) else ("training", data.train)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    usage = codebook_usage(method, dataset, min(cfg.optim.batch_size, 256), device)
    usage["codebook_split"] = split
    print(f"codebook usage on the {split} split ({usage['codebook_images']} images): "
          f"{100 * usage['codebook_usage']:.1f}% of {usage['codebook_size']} codes, "
          f"perplexity {usage['codebook_perplexity']:.1f}")
    results = run_dir / "results.json"
    summary = json.loads(results.read_text()) if results.is_file() else {"run_dir": str(run_dir)}
    write_json(results, {**summary, **usage})
    return usage
