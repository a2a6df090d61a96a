"""Feature-space augmentation networks (FRAug, Chen et al. ICCV 2023): a generator of
class-conditional features and a residual transformation network, both on the classifier's
pooled feature (64 values for the pre-activation ResNet-20). Shapes as in FRAug's code: the
generator [z, onehot(y)] -> fc-BN-ReLU -> fc-BN-ReLU -> feature; the transformation
[f, onehot(y)] -> fc-BN-ReLU -> fc-BN, added to a reference feature."""

from __future__ import annotations

import torch
from torch import nn


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return nn.functional.one_hot(y.long(), num_classes).float()


class FeatureGenerator(nn.Module):
    """G(z, y): a feature of class y from uniform noise z (FRAug draws z from U[0, 1))."""

    def __init__(self, feature_dim: int, num_classes: int, latent_dim: int) -> None:
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim + num_classes, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, one_hot(y, self.num_classes)], dim=1))


class ResidualTransform(nn.Module):
    """T(f, y, f_ref) = f_ref + residual([f, onehot(y)]): moves a generated feature towards
    this site's own feature distribution (kept private)."""

    def __init__(self, feature_dim: int, num_classes: int, latent_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(feature_dim + num_classes, latent_dim),
            nn.BatchNorm1d(latent_dim),
            nn.ReLU(),
            nn.Linear(latent_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
        )

    def forward(self, f: torch.Tensor, reference: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return reference + self.net(torch.cat([f, one_hot(y, self.num_classes)], dim=1))


def feature_augmenters(feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
    """The generator and the transformation; latent size half the feature's, as FRAug's default."""
    latent = max(feature_dim // 2, 1)
    return {
        "generator": FeatureGenerator(feature_dim, num_classes, latent),
        "transform": ResidualTransform(feature_dim, num_classes, latent),
    }
