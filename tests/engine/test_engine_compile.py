"""trainer.compile=true in CI: the engine compiles the method, trains it like the eager run, and saves plain keys.

Inductor (torch.compile's default backend) spends over a minute generating and compiling C++ for even a one-block
ViT on a CPU, so this test compiles with the `aot_eager` backend: the same TorchDynamo capture and AOTAutograd
forward and backward graphs, and the same Fabric path (the OptimizedModule is unwrapped, the plain module wrapped
and compiled again with the captured arguments), but the graphs run on eager kernels rather than generated code.
The slow test in tests/models/test_grad_checkpointing.py covers Inductor itself (`-m slow`).
"""

from __future__ import annotations

import lightning.fabric  # noqa: F401  (it wraps torch.compile on import; patch on top of its wrapper, not under it)
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from engine_tiny import tiny_config, tiny_data
from mimkit.engine import load_checkpoint, train

SMALL = ["optim.max_steps=2", "model.depth=1", "optim.batch_size=4", "eval.knn=false"]


def test_trainer_compile_trains_the_compiled_method_like_eager_and_saves_plain_keys(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    compiled_modules = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled_modules.append(type(model).__name__)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    counters.clear()
    data = tiny_data(n_train=16, n_val=8)
    compiled = train(tiny_config(tmp_path, "trainer.run_name=compiled", "trainer.compile=true", *SMALL), data=data)
    # trainer.compile was acted on: the method was compiled (by the trainer, then again by Fabric around its
    # wrapper) and Dynamo captured whole graphs of it
    assert compiled_modules and compiled_modules[0] == "MAE", compiled_modules
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager = train(tiny_config(tmp_path, "trainer.run_name=eager", *SMALL), data=data)
    keys = list(load_checkpoint(compiled.checkpoint)["model"])
    assert keys == list(eager.method.state_dict()) and not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in compiled.history]),
                               torch.tensor([h["loss"] for h in eager.history]), rtol=1e-4, atol=1e-5)
    assert compiled.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], abs=1e-4)
