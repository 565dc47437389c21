"""lade_vllm.adapter.warm: every CPU linear layer runs once at each small token count."""
from __future__ import annotations

import torch

from lade_vllm.adapter.warm import warm_linear_layers


class Recorded(torch.nn.Module):
    """A layer as vLLM's CPU GEMM dispatch leaves it: ``cpu_linear`` set, the weight possibly
    removed (an empty parameter) with the input size kept."""

    def __init__(self, k: int, n: int, removed: bool):
        super().__init__()
        w = torch.randn(n, k, dtype=torch.bfloat16)
        self.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16) if removed else w,
                                         requires_grad=False)
        self.input_size_per_partition = k
        self.seen = []
        self.cpu_linear = lambda x, weight, bias: (self.seen.append(tuple(x.shape)),
                                                   x @ w.t())[1]


def test_one_layer_per_shape_first_then_the_others_within_the_budget():
    model = torch.nn.Sequential(Recorded(8, 4, removed=True), torch.nn.ReLU(),
                                Recorded(4, 3, removed=False), Recorded(8, 4, removed=True))
    model[0].output_size_per_partition = model[3].output_size_per_partition = 4
    layers, seconds = warm_linear_layers(model, tokens=5, seconds=60.0)
    assert layers == 3 and seconds >= 0
    assert model[0].seen == model[3].seen == [(m, 8) for m in range(1, 6)]
    assert model[2].seen == [(m, 4) for m in range(1, 6)]
    for layer in (model[0], model[2], model[3]):
        layer.seen.clear()
    layers, _ = warm_linear_layers(model, tokens=5, seconds=0.0)   # no budget: one per shape
    assert layers == 2 and model[3].seen == [] and len(model[0].seen) == len(model[2].seen) == 5


def test_zero_turns_it_off(monkeypatch):
    monkeypatch.setenv("LADE_WARM_TOKENS", "0")
    model = torch.nn.Sequential(Recorded(8, 4, removed=True))
    assert warm_linear_layers(model) == (0, 0.0)
    assert model[0].seen == []
