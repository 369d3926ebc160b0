"""The sparsity pressure on BN scales: an L1 subgradient and the adaptive λ rule (paper §3.1.3)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def l1_subgradient_(gammas: list[torch.Tensor], lam: float) -> None:
    """grad(γ) += λ·sign(γ) for every γ at once — the subgradient of λ·Σ|γ|, with no per-layer Python loop."""
    if lam == 0 or not gammas:
        return
    grads = [g.grad for g in gammas]
    if any(g is None for g in grads):
        pairs = [(p, p.grad) for p in gammas if p.grad is not None]
        if not pairs:
            return
        gammas, grads = [p for p, _ in pairs], [g for _, g in pairs]
    torch._foreach_add_(grads, torch._foreach_sign(gammas), alpha=lam)


@dataclass
class LambdaController:
    """Every Δt: keep λ while r fell by more than Δr since the last check, else λ += Δλ. Reset to 0 on rejuvenation.

    Once λ is large enough each Δt lowers r by at least Δr, so r < Tr is reached within (1 − Tr)/Δr + O(1)
    checks. ``mode="fixed"`` holds λ at ``fixed`` instead (the official CIFAR recipe); ``lambda_max`` is an
    optional cap (not in the paper).
    """

    delta_r: float = 0.01
    delta_lambda: float = 5e-5
    mode: str = "adaptive"
    fixed: float = 1.5e-4
    lambda_max: float | None = None
    lam: float = 0.0
    prev_r: float | None = None

    def __post_init__(self):
        if self.mode == "fixed" and self.lam == 0.0:
            self.lam = self.fixed

    def update(self, r: float) -> float:
        if self.mode == "adaptive":
            if self.prev_r is None or r >= self.prev_r - self.delta_r:
                self.lam += self.delta_lambda
                if self.lambda_max is not None:
                    self.lam = min(self.lam, self.lambda_max)
        self.prev_r = r
        return self.lam

    def reset(self) -> None:
        self.lam = self.fixed if self.mode == "fixed" else 0.0
        self.prev_r = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
