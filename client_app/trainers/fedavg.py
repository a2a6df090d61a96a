"""FedAvg's local round: SGD on the classification loss over the whole classifier.

FedBN trains exactly like this (its difference, private BatchNorm layers, is in its
method contract); FedProx and SCAFFOLD override the hooks of `FedAvgTrainer` instead of
repeating the loop.
"""

from __future__ import annotations

import torch

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import RoundOptimizers, classification_loss, run_epochs
from core.config import RunConfig
from models import SiteModel


class FedAvgTrainer(Trainer):
    # -- hooks ------------------------------------------------------------------
    def start(self, model: SiteModel, job: LocalRound) -> None:
        """Called once the global model is loaded, before the first local step."""

    def optimizer(self, model: SiteModel, cfg: RunConfig) -> torch.optim.Optimizer:
        return self.optimizers.sgd("classifier", model.classifier.parameters(), cfg.lr, cfg)

    def penalty(self, model: SiteModel) -> torch.Tensor | float:
        """A term added to the classification loss of every step (FedProx)."""
        return 0.0

    def adjust_gradients(self, model: SiteModel) -> None:
        """Called between backward() and the optimiser step (SCAFFOLD's correction)."""

    def finish(self, model: SiteModel, job: LocalRound, steps: int) -> RoundResult:
        """The round's result beyond the training loss; `steps` = local steps taken."""
        return RoundResult(metrics={})

    # -- the round ----------------------------------------------------------------
    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        model.train()
        self.optimizers = RoundOptimizers(cfg, job.extras)
        self.start(model, job)
        optimizer = self.optimizer(model, cfg)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            loss = loss_fn(model.classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            (loss + self.penalty(model)).backward()
            self.adjust_gradients(model)
            optimizer.step()
            return loss.item()

        train_loss, steps = run_epochs(
            job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, step
        )
        result = self.finish(model, job, steps)
        result.metrics = {"train_loss": train_loss, **result.metrics}
        result.extras = {**result.extras, **self.optimizers.saved()}
        return result
