"""`python -m mimkit.engine [recipe.yaml] [key=value ...] [--resume PATH|auto]`: pretraining only.

Meant for launchers: `torchrun --nproc_per_node=N -m mimkit.engine recipe.yaml` (Fabric picks up the
torchrun world). The `mimkit` CLI adds evaluation and pictures on top of the same `train` call.
"""

from __future__ import annotations

import argparse
import sys

from mimkit.config import ConfigError, load_config
from mimkit.engine import CheckpointError, TrainingDiverged, train
from mimkit.engine.resume import config_for_resume


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimkit.engine", description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", help="an optional recipe .yaml followed by key=value overrides")
    parser.add_argument("--resume", default=None, help="checkpoint file, run directory, or 'auto'")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: apply overrides that change what is trained")
    args = parser.parse_args(argv)
    items = list(args.items)
    recipe = items.pop(0) if items and "=" not in items[0] else None
    try:
        cfg = config_for_resume(args.resume, recipe, items) if args.resume else load_config(recipe, items)
        result = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    except (ConfigError, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.is_global_zero:
        print(result.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
