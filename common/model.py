"""The shared segmentation network: MONAI's residual U-Net."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from common.config import ModelSettings


def build_model(settings: ModelSettings) -> torch.nn.Module:
    """Build the U-Net every node shares.

    Input ``B x in_channels x H x W[ x D]``, output logits
    ``B x out_channels x H x W[ x D]``; spatial sizes must be multiples of
    ``settings.divisor``. Instance normalisation keeps no running statistics, so
    the weights are the whole state and FedAvg averages all of it.
    """
    return UNet(
        spatial_dims=settings.spatial_dims,
        in_channels=settings.in_channels,
        out_channels=settings.out_channels,
        channels=settings.channels,
        strides=(2,) * (len(settings.channels) - 1),
        num_res_units=settings.res_units,
        dropout=settings.dropout,
    )


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        from common.errors import ConfigError

        raise ConfigError(f"device {requested!r} was asked for but CUDA is not available")
    return device
