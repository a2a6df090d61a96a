"""FusedSpaceFed's local round: encoder warm-up, then fused training (method.md section 1)."""

from __future__ import annotations

import torch
from torch import nn

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import classification_loss, run_epochs, set_trainable, sgd
from models import SiteModel


def reconstruction_loss(model: SiteModel, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model.reconstruct(x), x)


def task_aware_loss(
    model: SiteModel, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, lambda_rec: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(C(x + D(E(x))), y) + lambda * MSE(D(E(x)), x); CE gradients reach D and E_i.

    Returns (total loss, classification loss, reconstruction loss)."""
    x_rec = model.reconstruct(x)
    cls = loss_fn(model.classifier(x + x_rec), y)
    rec = nn.functional.mse_loss(x_rec, x)
    return cls + lambda_rec * rec, cls, rec


def decoupled_losses(
    model: SiteModel, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's update: (MSE for E_i and D, CE on x + detached x_rec for C)."""
    x_rec = model.reconstruct(x)
    rec = nn.functional.mse_loss(x_rec, x)
    cls = loss_fn(model.classifier(x + x_rec.detach()), y)
    return rec, cls


class FusedSpaceFedTrainer(Trainer):
    def warm_up(self, model: SiteModel, job: LocalRound) -> float:
        """Re-align E_i to the new global decoder: D and C frozen, reconstruction loss only."""
        cfg = job.cfg
        model.train()
        set_trainable(model, False)
        set_trainable(model.encoder, True)
        optimizer = sgd(model.encoder.parameters(), cfg.lr_ae, cfg)

        def step(x: torch.Tensor, _: torch.Tensor) -> float:
            loss = reconstruction_loss(model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        try:
            loss, _ = run_epochs(job.data.train, cfg.warmup_epochs, cfg.batch_size, job.device, job.generator, step)
        finally:
            set_trainable(model, True)
        return loss

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        warm_loss = self.warm_up(model, job)
        model.train()

        # 2. Fused local training.
        ae_opt = sgd([*model.encoder.parameters(), *model.decoder.parameters()], cfg.lr_ae, cfg)
        cls_opt = sgd(model.classifier.parameters(), cfg.lr, cfg)
        rec_total = 0.0

        def fused_step(x: torch.Tensor, y: torch.Tensor) -> float:
            nonlocal rec_total
            if cfg.task_aware:
                total, cls, rec = task_aware_loss(model, x, y, loss_fn, cfg.lambda_rec)
                ae_opt.zero_grad(set_to_none=True)
                cls_opt.zero_grad(set_to_none=True)
                total.backward()
                ae_opt.step()
                cls_opt.step()
            else:
                rec, cls = decoupled_losses(model, x, y, loss_fn)
                ae_opt.zero_grad(set_to_none=True)
                rec.backward()
                ae_opt.step()
                cls_opt.zero_grad(set_to_none=True)
                cls.backward()
                cls_opt.step()
            rec_total += rec.item()
            return cls.item()

        train_loss, steps = run_epochs(
            job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, fused_step
        )
        return RoundResult(
            metrics={"train_loss": train_loss, "rec_loss": rec_total / max(steps, 1), "warmup_loss": warm_loss}
        )
