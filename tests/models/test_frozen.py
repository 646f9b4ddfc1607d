import torch
import torch.nn as nn

from mimkit.models.frozen import HoldsFrozen


class Holder(HoldsFrozen):
    def __init__(self):
        super().__init__()
        self.trained = nn.Linear(3, 2)
        self.hold_frozen("_frozen", nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))


def test_a_held_module_is_frozen_and_outside_parameters_and_state_dict():
    h = Holder()
    assert [n for n, _ in h.named_parameters()] == ["trained.weight", "trained.bias"]
    assert set(h.state_dict()) == {"trained.weight", "trained.bias"}
    assert not any(p.requires_grad for p in h._frozen.parameters())
    assert not h._frozen.training


def test_a_held_module_follows_dtype_moves_and_stays_in_eval_mode():
    h = Holder().double()
    assert h._frozen[0].weight.dtype == torch.float64 and h.trained.weight.dtype == torch.float64
    h.train()
    assert h.training and h.trained.training and not h._frozen.training and not h._frozen[1].training
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(h._frozen(x), h._frozen(x))  # dropout off: eval mode
