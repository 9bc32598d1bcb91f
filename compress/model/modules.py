"""Modules a compressed model holds that its config does not build: LowRankLinear (the low-rank
stage's two thin Linears), and narrower Linears (structured pruning); their specs ({"type",
"in", "out", ...}, what layout.json and a block file record) and how a model is rebuilt to fit
them."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError


class LowRankLinear(nn.Module):
    """y = up(down(x)) [+ residual(x)]: a rank-r factorisation W ~ U V of an (out, in) Linear.

    `residual` (optional) is a sparse correction stored as a dense Linear whose other weights are
    exactly zero (the sparse export stores only its nonzeros).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, residual: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Linear(in_features, rank, bias=False, **kw)
        self.up = nn.Linear(rank, out_features, bias=bias, **kw)
        self.residual = nn.Linear(in_features, out_features, bias=False, **kw) if residual else None

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.residual is None else y + self.residual(x)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this module multiplies by."""
        W = self.up.weight.float() @ self.down.weight.float()
        return W if self.residual is None else W + self.residual.weight.float()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def spec_of(module: nn.Module) -> dict:
    if isinstance(module, LowRankLinear):
        return {"type": "lowrank", "in": module.in_features, "out": module.out_features, "rank": module.rank,
                "bias": module.up.bias is not None, "residual": module.residual is not None}
    return {"type": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}


def build(spec: dict, dtype: torch.dtype, device) -> nn.Module:
    if spec["type"] == "lowrank":
        return LowRankLinear(spec["in"], spec["out"], spec["rank"], spec["bias"], spec["residual"], dtype, device)
    return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype, device=device)


def rebuild(model: nn.Module, layout: dict[str, dict]) -> None:
    """Replace the named modules by new (uninitialised) ones of the layout's shapes."""
    for name, spec in layout.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"layout.json: the model has no module {name}") from None
        parent, _, child = name.rpartition(".")
        weight = next(old.parameters())
        setattr(model.get_submodule(parent), child, build(spec, weight.dtype, weight.device))
