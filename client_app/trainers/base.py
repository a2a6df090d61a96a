"""The contract between the ClientApp and a method's local trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import RecordDict

from client_app.site_data import SiteData
from core.config import RunConfig
from models import CLASSIFIER, SiteModel, part_of


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


@dataclass
class RoundResult:
    metrics: dict[str, float]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # private, persisted, never sent
    outgoing: RecordDict | None = None  # extra records for the server (e.g. control variate update)


class Trainer:
    """A method's client side. Subclasses say which model parts are shared and train."""

    shared_parts: tuple[str, ...] = (CLASSIFIER,)

    def shared_keys(self, model: SiteModel) -> list[str]:
        """State_dict keys sent to and received from the server; all others stay private."""
        return [k for k in model.state_dict() if part_of(k) in self.shared_parts]

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        raise NotImplementedError
