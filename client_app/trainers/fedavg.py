"""FedAvg's local round: SGD on the classification loss over the whole classifier."""

from __future__ import annotations

import torch

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import classification_loss, run_epochs, sgd
from models import SiteModel


class FedAvgTrainer(Trainer):
    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        model.train()
        optimizer = sgd(model.classifier.parameters(), cfg.lr, cfg)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            loss = loss_fn(model.classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        train_loss, _ = run_epochs(job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, step)
        return RoundResult(metrics={"train_loss": train_loss})
