"""Output activations of the VGGT heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_log(y: Tensor) -> Tensor:
    """``sign(y) * (exp(|y|) - 1)``: point maps predicted in a log-compressed space."""
    return torch.sign(y) * torch.expm1(y.abs())


def activate_pose(enc: Tensor) -> Tensor:
    """Pose encoding [..., 9] = T(3) linear, quaternion(4) linear, field of view(2) through ReLU."""
    return torch.cat([enc[..., :7], F.relu(enc[..., 7:])], dim=-1)


def activate_dense(out: Tensor, activation: str, conf_activation: str = "expp1") -> tuple[Tensor, Tensor]:
    """Split a DPT output [N, D+1, H, W] into values [N, H, W, D] and confidence [N, H, W].

    activation: "inv_log" (points), "exp" (depth) or "linear"; conf_activation: "expp1" = 1 + exp.
    """
    fmap = out.permute(0, 2, 3, 1)
    values, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "inv_log":
        values = inverse_log(values)
    elif activation == "exp":
        values = torch.exp(values)
    elif activation != "linear":
        raise ValueError(f"unknown dense activation {activation!r}; use inv_log, exp or linear")
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ValueError(f"unknown confidence activation {conf_activation!r}; use expp1 or sigmoid")
    return values, conf
