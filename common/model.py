"""The shared segmentation network: MONAI's residual U-Net."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from common.config import ModelSettings


def build_model(settings: ModelSettings, *, few_channel_layout: bool = True
                ) -> torch.nn.Module:
    """Build the U-Net every node shares.

    Input ``B x in_channels x H x W[ x D]``, output logits
    ``B x out_channels x H x W[ x D]``; spatial sizes must be multiples of
    ``settings.divisor``. Instance normalisation keeps no running statistics, so
    the weights are the whole state and FedAvg averages all of it.
    ``few_channel_layout``: see :func:`few_channel_convolutions_channels_last`.
    """
    model = UNet(
        spatial_dims=settings.spatial_dims,
        in_channels=settings.in_channels,
        out_channels=settings.out_channels,
        channels=settings.channels,
        strides=(2,) * (len(settings.channels) - 1),
        num_res_units=settings.res_units,
        dropout=settings.dropout,
    )
    if few_channel_layout:
        few_channel_convolutions_channels_last(model)
    return model


# A 3D convolution of this few channels in and out (the U-Net's last, one channel a
# class to one channel a class, at full resolution) runs about twice as fast on a
# CPU in channels-last memory order (oneDNN; torch 2.13, 2 and 3 classes to 8
# measured, docs/performance.md); one input channel gains nothing.
FEW_CHANNELS = range(2, 9)


def few_channel_convolutions_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """On a CPU, hand each 3D convolution of a few channels (:data:`FEW_CHANNELS`)
    its input in channels-last order and give its output back in the usual
    one: the backward of the U-Net's last convolution alone was a quarter of
    a training step. Only the memory order changes: the weights, the state
    dict and the results (to float rounding) are the same, and on a GPU
    nothing is done."""
    for module in model.modules():
        if (isinstance(module, torch.nn.Conv3d) and module.in_channels in FEW_CHANNELS
                and module.out_channels in FEW_CHANNELS):
            module.register_forward_pre_hook(_channels_last_input)
            module.register_forward_hook(_usual_order_output)
    return model


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if x.device.type == "cpu" and x.dim() == 5:
        return (x.contiguous(memory_format=torch.channels_last_3d), *args[1:])
    return None


def _usual_order_output(module: torch.nn.Module, args: tuple, out: torch.Tensor
                        ) -> torch.Tensor | None:
    return out.contiguous() if out.device.type == "cpu" else None


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        from common.errors import ConfigError

        raise ConfigError(f"device {requested!r} was asked for but CUDA is not available")
    return device
