"""Models and the one definition of which state_dict keys belong to which part.

Every model is a `SiteModel` with up to three named children: `encoder` (private,
FusedSpaceFed only), `decoder` (shared) and `classifier` (shared). A state_dict key's
part is its first dotted component, so the split can never drift from the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from core.config import RunConfig
from core.methods import AUX, CLASSIFIER, DECODER, ENCODER, PARTS, MethodContract
from models.autoencoders import build_autoencoder
from models.classifier import PreActResNet20

__all__ = ["AUX", "CLASSIFIER", "DECODER", "ENCODER", "PARTS", "SiteModel", "build_model", "build_run_model", "part_of"]


class SiteModel(nn.Module):
    """Classifier, optionally preceded by the autoencoder that produces the fused input."""

    def __init__(
        self,
        classifier: nn.Module,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        aux: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        if (encoder is None) != (decoder is None):
            raise ValueError("encoder and decoder come together")
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = classifier
        # networks a method trains beside the classifier (FRAug's generator and transformation);
        # they never enter the forward pass that is evaluated
        self.aux = nn.ModuleDict(aux) if aux else None

    @property
    def fused(self) -> bool:
        return self.encoder is not None

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x_rec = D(E_i(x))."""
        return self.decoder(self.encoder(x))

    def keys_of(self, parts: Iterable[str], *, batchnorm: bool = True) -> list[str]:
        """State_dict keys of the given parts, with or without BatchNorm layers."""
        wanted = set(parts)
        return [k for k in self.state_dict() if part_of(k) in wanted and (batchnorm or not is_batchnorm_key(self, k))]

    def batchnorm_keys(self) -> set[str]:
        """State_dict keys of BatchNorm layers (FedBN keeps them private)."""
        return {k for k in self.state_dict() if is_batchnorm_key(self, k)}

    def batchnorm_statistics_keys(self) -> set[str]:
        """BatchNorm running statistics and counters (FRAug keeps them private)."""
        return {k for k in self.batchnorm_keys() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits = C(x + D(E_i(x))) for FusedSpaceFed, C(x) otherwise."""
        if self.fused:
            x = x + self.reconstruct(x)
        return self.classifier(x)


def build_model(
    *,
    fused: bool,
    in_channels: int,
    num_classes: int,
    image_size: int,
    ae_arch: str = "bottleneck",
    dz: int = 16,
    norm: str = "batch",
    quiet_start: bool = False,
) -> SiteModel:
    """The site model: ResNet-20 classifier (BatchNorm or GroupNorm), plus the autoencoder
    when `fused` (`quiet_start`: its output layer starts at zero, see autoencoders.py)."""
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"need at least one channel and one class, got {in_channels} and {num_classes}")
    classifier = PreActResNet20(in_channels, num_classes, norm=norm)
    if not fused:
        return SiteModel(classifier)
    encoder, decoder = build_autoencoder(ae_arch, in_channels, image_size, dz, quiet_start=quiet_start)
    return SiteModel(classifier, encoder, decoder)


def build_run_model(cfg: RunConfig, spec, seed: int, *, contract: MethodContract) -> SiteModel:
    """The model a run configuration (`core.config.RunConfig`) asks for on a dataset
    (`partitions.medmnist_data.DatasetSpec`), initialised from `seed`; `contract`: the method's
    (`core.methods.contract_for(cfg.method)`), which the caller holds already."""
    torch.manual_seed(seed)
    if contract.classifier_builder:  # a method with its own classifier (FuseFL's fused columns)
        return SiteModel(contract.build_classifier(spec.channels, spec.num_classes, cfg.classifier_norm, cfg))
    model = build_model(
        fused=cfg.fused,
        in_channels=spec.channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
        ae_arch=cfg.ae_arch,
        dz=cfg.dz,
        norm=cfg.classifier_norm,
        quiet_start=cfg.rules.quiet_autoencoder_start,
    )
    aux = contract.build_aux_modules(model.classifier.feature_dim, spec.num_classes)
    if aux:
        model.aux = nn.ModuleDict(aux)
    return model


def part_of(key: str) -> str:
    """Which part ('encoder', 'decoder', 'classifier', 'aux') a state_dict key belongs to."""
    part = key.split(".", 1)[0]
    if part not in PARTS:
        raise KeyError(f"state_dict key {key!r} belongs to no known model part {PARTS}")
    return part


def is_batchnorm_key(model: nn.Module, key: str) -> bool:
    """True for the parameters and buffers of BatchNorm layers (FedBN keeps them private)."""
    module_name = key.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(module_name), nn.modules.batchnorm._BatchNorm)


def select_state(state: Mapping[str, torch.Tensor], parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of `state` whose part is in `parts` (detached copies)."""
    wanted = set(parts)
    return {k: v.detach().clone() for k, v in state.items() if part_of(k) in wanted}
