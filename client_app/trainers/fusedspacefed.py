"""FusedSpaceFed's local round: encoder warm-up, then fused training (method.md section 1).

Options usable under either protocol: `warmup-epochs = 0` (the reference code's plain
variant, no warm-up) and `l2sp-lambda > 0` (its L2SP variant: `lambda * ||w_enc -
w_enc_init||^2` added to the autoencoder loss, anchored at the site's own initial
encoder, which is kept as private extras `l2sp/<key>` from round 1 on).
"""

from __future__ import annotations

import torch
from torch import nn

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import RoundOptimizers, classification_loss, run_epochs, set_trainable
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


L2SP_EXTRAS = "l2sp"


def l2sp_anchor(model: SiteModel, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder the L2-SP prior pulls towards: the site's initial one (kept in extras;
    the model's current encoder in the site's first round, before any training)."""
    saved = {k[len(L2SP_EXTRAS) + 1 :]: v for k, v in extras.items() if k.startswith(L2SP_EXTRAS + "/")}
    if saved:
        return saved
    return {name: p.detach().clone() for name, p in model.encoder.named_parameters()}


def l2sp_penalty(model: SiteModel, anchor: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    return weight * sum(((p - anchor[n].to(p.device)) ** 2).sum() for n, p in model.encoder.named_parameters())


class FusedSpaceFedTrainer(Trainer):
    def warm_up(self, model: SiteModel, job: LocalRound, optimizers: RoundOptimizers | None = None) -> float:
        """Re-align E_i to the new global decoder: D and C frozen, reconstruction loss only."""
        cfg = job.cfg
        model.train()
        set_trainable(model, False)
        set_trainable(model.encoder, True)
        optimizers = optimizers or RoundOptimizers(cfg, job.extras)
        optimizer = optimizers.sgd("warmup", model.encoder.parameters(), cfg.lr_ae)

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
        optimizers = RoundOptimizers(cfg, job.extras)
        anchor = l2sp_anchor(model, job.extras) if cfg.l2sp_lambda > 0 else None
        warm_loss = self.warm_up(model, job, optimizers) if cfg.warmup_epochs > 0 else float("nan")
        model.train()

        # 2. Fused local training.
        ae_params = [*model.encoder.parameters(), *model.decoder.parameters()]
        ae_opt = optimizers.sgd("autoencoder", ae_params, cfg.lr_ae)
        cls_opt = optimizers.sgd("classifier", model.classifier.parameters(), cfg.lr)
        rec_total = 0.0

        def prior() -> torch.Tensor | float:
            return l2sp_penalty(model, anchor, cfg.l2sp_lambda) if anchor is not None else 0.0

        def fused_step(x: torch.Tensor, y: torch.Tensor) -> float:
            nonlocal rec_total
            if cfg.task_aware:
                total, cls, rec = task_aware_loss(model, x, y, loss_fn, cfg.lambda_rec)
                ae_opt.zero_grad(set_to_none=True)
                cls_opt.zero_grad(set_to_none=True)
                (total + prior()).backward()
                ae_opt.step()
                cls_opt.step()
            else:
                rec, cls = decoupled_losses(model, x, y, loss_fn)
                ae_opt.zero_grad(set_to_none=True)
                (rec + prior()).backward()
                ae_opt.step()
                cls_opt.zero_grad(set_to_none=True)
                cls.backward()
                cls_opt.step()
            rec_total += rec.item()
            return cls.item()

        train_loss, steps = run_epochs(
            job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, fused_step
        )
        extras = optimizers.saved()
        if anchor is not None:
            extras.update({f"{L2SP_EXTRAS}/{k}": v.detach().cpu() for k, v in anchor.items()})
        metrics = {"train_loss": train_loss, "rec_loss": rec_total / max(steps, 1)}
        if cfg.warmup_epochs > 0:
            metrics["warmup_loss"] = warm_loss
        return RoundResult(metrics=metrics, extras=extras)
