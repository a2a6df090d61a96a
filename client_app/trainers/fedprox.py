"""FedProx's local round: FedAvg plus (mu/2) * ||w - w_global||^2 over the classifier's
parameters (method.md section 2; mu = `proximal-mu`, reference 0.01).

`train_loss` stays the classification loss alone, so it compares with FedAvg's.
"""

from __future__ import annotations

import torch

from client_app.trainers.base import LocalRound
from client_app.trainers.fedavg import FedAvgTrainer
from models import SiteModel


class FedProxTrainer(FedAvgTrainer):
    def start(self, model: SiteModel, job: LocalRound) -> None:
        self.mu = job.cfg.proximal_mu
        self.global_params = [p.detach().clone() for p in model.classifier.parameters()]

    def penalty(self, model: SiteModel) -> torch.Tensor | float:
        squared = sum(((p - g) ** 2).sum() for p, g in zip(model.classifier.parameters(), self.global_params))
        return 0.5 * self.mu * squared
