"""Run by test_engine_fsdp under `python -m torch.distributed.run`: a tiny FSDP run stopped early, then resumed
in the same processes; rank 0 saves both phases' histories and metrics.

usage: fsdp_worker.py OUT_DIR RESULT_FILE STOP_AFTER [key=value ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_tiny import tiny_config, tiny_data  # noqa: E402
from mimkit.engine import train  # noqa: E402


def main():
    out_dir, result_file, stop_after, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = tiny_config(out_dir, "trainer.strategy=fsdp", *overrides)
    first = train(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"stop_after_steps": int(stop_after)})}), data=tiny_data())
    stopped = torch.load(first.checkpoint, map_location="cpu", weights_only=True)
    second = train(cfg, resume=first.run_dir, data=tiny_data())
    if second.fabric.is_global_zero:
        torch.save({"world": second.fabric.world_size, "strategy": type(second.fabric.strategy).__name__,
                    "first": first.history, "second": second.history, "metrics": second.metrics,
                    "stopped_progress": stopped["progress"], "stopped_keys": sorted(stopped["model"]),
                    "state": {k: v.detach().cpu() for k, v in second.method.state_dict().items()}}, result_file)


if __name__ == "__main__":
    main()
