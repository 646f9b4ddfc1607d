"""Run by test_engine_ddp under `python -m torch.distributed.run`: a tiny run, results saved by rank 0.

usage: ddp_worker.py OUT_DIR RESULT_FILE [key=value ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_tiny import tiny_config, tiny_data  # noqa: E402
from mimkit.engine import train  # noqa: E402


def main():
    out_dir, result_file, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = tiny_config(out_dir, "trainer.strategy=ddp", *overrides)
    result = train(cfg, data=tiny_data())
    if result.fabric.is_global_zero:
        torch.save({"history": result.history, "metrics": result.metrics, "world": result.fabric.world_size,
                    "state": {k: v.detach().cpu() for k, v in result.method.state_dict().items()}}, result_file)


if __name__ == "__main__":
    main()
