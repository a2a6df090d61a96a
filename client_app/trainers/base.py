"""The contract between the ClientApp and a method's local trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import RecordDict

from core.config import RunConfig
from models import SiteModel
from partitions.site_data import SiteData


@dataclass
class LocalRound:
    """Everything a trainer needs for one round at one site."""

    cfg: RunConfig
    data: SiteData
    device: torch.device
    generator: torch.Generator
    server_round: int
    incoming: RecordDict  # the server's message content (e.g. SCAFFOLD's control variate)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # private non-model state
    site_id: int = 0  # this site's number (partition-id, or the deployed site's)


@dataclass
class RoundResult:
    metrics: dict[str, float]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # private, persisted, never sent
    outgoing: RecordDict | None = None  # extra records for the server (e.g. control variate update)


class Trainer:
    """A method's client side: one local round. What the site shares is the method
    contract's business (core.methods), not the trainer's."""

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        raise NotImplementedError

    def personal(self, model: SiteModel, extras: dict[str, torch.Tensor]) -> SiteModel:
        """The model this site evaluates and predicts with, from the model (global arrays
        plus private parts) and the site's private extras. Only a method whose contract says
        `personal_model` uses it: Ditto (its v), FuseFL (its stage model until every level is
        fused); `extras` may be empty (no round yet)."""
        return model
