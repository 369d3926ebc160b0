"""Optimizer state of weights edited in place. A unit whose weights are re-initialised (ReDo, CBP) must also lose
its SGD momentum (or Adam's moments): the old velocity would push the fresh weights along the old direction at
the next step. Generic over optimizers: every per-entry state tensor (the parameter's shape) is edited, scalars
such as Adam's step count are left alone."""
from __future__ import annotations

import torch


def zero_optimizer_state(opt: torch.optim.Optimizer | None, param: torch.Tensor, index: torch.Tensor,
                         dim: int = 0) -> None:
    """Zero the per-entry state of ``param``'s slices ``index`` along ``dim`` (index_fill_: no host sync). A
    parameter the optimizer holds no state for yet (before its first step) is left as it is."""
    if opt is None:
        return
    state = opt.state.get(param)  # .get: opt.state is a defaultdict; do not create entries
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0)
