"""The two autoencoders of FusedSpaceFed: a private encoder E_i and a shared decoder D.

Every encoder returns a tuple of tensors and every decoder consumes that tuple, so the
fused model treats both architectures the same way. For `unet` the tuple carries the
skip features: the shared decoder consumes private encoder activations (as in the
reference code), but only the decoder's *weights* ever leave the site.
"""

from __future__ import annotations

import torch
from torch import nn


def _halvings(image_size: int) -> int:
    """Number of stride-2 stages that bring the image to at most 8x8."""
    steps, size = 0, image_size
    while size > 8:
        if size % 2:
            raise ValueError(
                f"image size {image_size} cannot be halved down to <= 8 pixels evenly; "
                "use a MedMNIST size (28, 64, 128, 224)"
            )
        size //= 2
        steps += 1
    return max(steps, 1)


class BottleneckEncoder(nn.Module):
    """Conv stack with stride 2 down to <= 8x8, then a linear map to a `dz` latent vector."""

    def __init__(self, in_channels: int, image_size: int, dz: int) -> None:
        super().__init__()
        steps = _halvings(image_size)
        widths = [min(32 * 2**i, 128) for i in range(steps)]
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.final_size = image_size // 2**steps
        self.to_latent = nn.Linear(channels * self.final_size**2, dz)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.to_latent(torch.flatten(self.features(x), 1)),)


class BottleneckDecoder(nn.Module):
    """Linear map from the latent vector, then transposed convs back to the input shape."""

    def __init__(self, out_channels: int, image_size: int, dz: int) -> None:
        super().__init__()
        steps = _halvings(image_size)
        widths = [min(32 * 2**i, 128) for i in range(steps)][::-1]
        self.start_channels = widths[0]
        self.start_size = image_size // 2**steps
        self.from_latent = nn.Linear(dz, widths[0] * self.start_size**2)
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            nxt = widths[i + 1] if i + 1 < len(widths) else out_channels
            layers.append(nn.ConvTranspose2d(width, nxt, 4, 2, 1))
            if i + 1 < len(widths):
                layers.append(nn.ReLU(inplace=True))
        self.upsample = nn.Sequential(*layers)  # linear output: no final activation

    def forward(self, latent: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (z,) = latent
        h = torch.relu(self.from_latent(z))
        h = h.view(-1, self.start_channels, self.start_size, self.start_size)
        return self.upsample(h)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, 1, 1),
        nn.ReLU(inplace=True),
    )


class UNetEncoder(nn.Module):
    """Two conv blocks with 2x max-pool and a bottleneck block (16/32/64, no BatchNorm)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the unet autoencoder needs an image size divisible by 4, got {image_size}")
        self.enc1 = _conv_block(in_channels, 16)
        self.enc2 = _conv_block(16, 32)
        self.bottleneck = _conv_block(32, 64)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        return self.bottleneck(self.pool(skip2)), skip2, skip1


class UNetDecoder(nn.Module):
    """2x2 transposed convs, concatenation with the encoder's skips, 1x1 linear output."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(64, 32, 2, 2)
        self.dec2 = _conv_block(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec1 = _conv_block(32, 16)
        self.final = nn.Conv2d(16, out_channels, 1)

    def forward(self, latent: tuple[torch.Tensor, ...]) -> torch.Tensor:
        bottom, skip2, skip1 = latent
        h = self.dec2(torch.cat([self.up2(bottom), skip2], dim=1))
        h = self.dec1(torch.cat([self.up1(h), skip1], dim=1))
        return self.final(h)


QUIET_START_LEVEL = 0.5  # mid-grey: the middle of the [0, 1] input range


def output_layer(decoder: nn.Module) -> nn.Module:
    return decoder.final if isinstance(decoder, UNetDecoder) else decoder.upsample[-1]


def build_autoencoder(
    arch: str, channels: int, image_size: int, dz: int, *, quiet_start: bool = False
) -> tuple[nn.Module, nn.Module]:
    """Return (encoder, decoder) for `ae-arch`.

    `quiet_start` zeroes the decoder's output weights and sets its bias to mid-grey, so
    x_rec starts as a flat image instead of PyTorch's default initialisation, whose
    outputs are about 30 times the images' variance off (R^2 near -33 on BloodMNIST); the
    autoencoder then learns several times faster (docs/recipe.md has the measurements).
    The reference protocol keeps the default initialisation."""
    if arch == "bottleneck":
        encoder, decoder = BottleneckEncoder(channels, image_size, dz), BottleneckDecoder(channels, image_size, dz)
    elif arch == "unet":
        encoder, decoder = UNetEncoder(channels, image_size), UNetDecoder(channels)
    else:
        raise ValueError(f"unknown ae-arch {arch!r}: choose 'bottleneck' or 'unet'")
    if quiet_start:
        last = output_layer(decoder)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, QUIET_START_LEVEL)
    return encoder, decoder
