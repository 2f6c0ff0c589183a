"""Unlearning objectives of CodeEraser (Chu et al., ICSE'26; official code `unlearning/model.py`).

Per-token loss on a sample x with shifted targets: ℓ_t = CE(logits_{t−1}, x_t), padding excluded;
s_t = 1 on secret tokens. p_θ and p_ref are the next-token distributions of the model being
unlearned and of its frozen original (softmax of max-subtracted fp32 logits), and
    KL(P) = Σ_{t∈P} Σ_v p'_ref,t(v) [log p'_ref,t(v) − log(p_θ,t(v) + 1e-10)],  p' = p + 1e-10,
i.e. ``F.kl_div(log(p_θ + 1e-10), p_ref + 1e-10)`` summed, then divided like ``reduction='batchmean'``
on the official tensor shapes: by the number of rows B for all positions, by |P| for secret positions.

    ga           forget:  L = −mean_t ℓ_t
    cu           forget:  L = −mean_t ℓ_t − λ·KL_all / B          retain: L = λα·KL_all / B
    ssga         forget:  L = −mean_{s_t=1} ℓ_t + γ·mean_{s_t=0} ℓ_t
    code_eraser  forget:  L = −mean_{s_t=1} ℓ_t + γ·mean_{s_t=0} ℓ_t − λ·KL_secret / |secret|
                 retain:  L = λα·KL_all / B
(code_eraser = the paper's SSCU; ga and ssga take no retain step.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["ga", "cu", "ssga", "code_eraser"]
METHODS: tuple[Method, ...] = ("ga", "cu", "ssga", "code_eraser")
USES_RETAIN = {"ga": False, "cu": True, "ssga": False, "code_eraser": True}


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ of shape (B, T−1), valid mask of the shifted targets)."""
    valid = attention_mask[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    return losses * valid, valid


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Σ over ``positions`` (B, T−1 bool, shifted) of KL(p_ref ‖ p_θ) with the official 1e-10 smoothing."""
    def probs(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :-1][positions].float()
        return torch.softmax(x - x.max(dim=-1, keepdim=True).values, dim=-1)

    return F.kl_div((probs(logits) + 1e-10).log(), probs(ref_logits) + 1e-10, reduction="sum")


def forget_loss(method: Method, logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: dict[str, torch.Tensor],
                gamma: float = 0.1, lam: float = 0.1) -> torch.Tensor:
    """The loss minimised on a forget batch (keys input_ids, attention_mask, secret_mask)."""
    losses, valid = token_losses(logits, batch["input_ids"], batch["attention_mask"])
    if method in ("ga", "cu"):
        loss = -losses.sum() / valid.sum()
        if method == "cu":
            loss = loss - lam * kl_to_reference(logits, ref_logits, valid) / len(logits)
        return loss
    secret = batch["secret_mask"][:, 1:] & valid
    context = ~batch["secret_mask"][:, 1:] & valid
    loss = -losses[secret].mean() + gamma * losses[context].mean()
    if method == "code_eraser":
        loss = loss - lam * kl_to_reference(logits, ref_logits, secret) / secret.sum()
    return loss


def retain_loss(logits: torch.Tensor, ref_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                lam: float = 0.1, alpha: float = 1.0) -> torch.Tensor:
    """λα·KL(p_ref ‖ p_θ) over all non-padding positions of a retain batch, divided by its rows."""
    valid = batch["attention_mask"][:, 1:].bool()
    return lam * alpha * kl_to_reference(logits, ref_logits, valid) / len(logits)
