"""FusedSpaceFed's local round: encoder warm-up, then fused training (method.md section 1).

Under the standard protocol (docs/recipe.md):
- the autoencoder trains with its own optimiser (`ae-optimizer = "adam"`);
- round 1's warm-up trains the decoder too. The global decoder is then still its random
  initialisation, and an encoder alone cannot learn to drive a random decoder (R^2 -8
  after three epochs on BloodMNIST); from round 2 on the warm-up re-aligns E_i to the
  averaged decoder with D and C frozen, as the method says;
- `rec-loss = "image-sum"` sums the squared error over each image's pixels, as the
  cross-entropy sums over each image's classes: with the per-pixel mean the
  cross-entropy's gradient on x_rec was about 117 times the reconstruction's, and the
  autoencoder collapsed to a constant image;
- every fresh Adam of the autoencoder (the warm-up's, the fused training's: each round)
  ramps its learning rate up over `ae-lr-ramp` steps. Without it the first steps of the
  fused training moved every weight by about `lr-ae` and undid the warm-up (R^2 0.55 ->
  -0.81 in 6 steps on a demo site); on a small site the whole fused training is those steps;
- the warm-up runs whole epochs until it has at least `warmup-min-steps` batches: a site of
  108 images gets 4 batches an epoch, far too few for the autoencoder to learn anything;
- every site's encoder starts from the run's initial model (`shared-encoder-init`, applied
  where the site builds its model, client_app/site.py), so that the decoders the sites train
  in round 1 read the same features and average better (round 2's worst R^2 on RetinaMNIST
  0.37 -> 0.61; still short of 0.8, docs/recipe.md).
The reconstruction's health (R^2 and input dependence, client_app.evaluation) is measured on
the site's own images before the warm-up (`_received`: its E_i with the received averaged
decoder, the pair the site evaluates with), after the warm-up and after training (with the
decoder as the site trained it), and reported as metrics.

Options usable under either protocol: `warmup-epochs = 0` (the reference code's plain
variant, no warm-up) and `l2sp-lambda > 0` (its L2SP variant: `lambda * ||w_enc -
w_enc_init||^2` added to the autoencoder loss, anchored at the site's own initial
encoder, which is kept as private extras `l2sp/<key>` from round 1 on).
"""

from __future__ import annotations

import torch
from torch import nn

from client_app.evaluation import fused_space_health, health_images
from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import (
    RoundOptimizers,
    classification_loss,
    epochs_for_steps,
    run_epochs,
    set_trainable,
)
from core.config import RunConfig
from models import SiteModel


def rec_error(x_rec: torch.Tensor, x: torch.Tensor, kind: str = "pixel-mean") -> torch.Tensor:
    """Squared reconstruction error: per-pixel mean, or summed over each image's pixels
    and averaged over the batch (`image-sum`)."""
    if kind == "image-sum":
        return (x_rec - x).pow(2).flatten(1).sum(1).mean()
    return nn.functional.mse_loss(x_rec, x)


def reconstruction_loss(model: SiteModel, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model.reconstruct(x), x)


def task_aware_loss(
    model: SiteModel, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, lambda_rec: float, kind: str = "pixel-mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(C(x + D(E(x))), y) + lambda * rec_error(D(E(x)), x); CE gradients reach D and E_i.

    Returns (total loss, classification loss, reconstruction loss as the per-pixel MSE)."""
    x_rec = model.reconstruct(x)
    cls = loss_fn(model.classifier(x + x_rec), y)
    rec = rec_error(x_rec, x, kind)
    mse = rec if kind == "pixel-mean" else nn.functional.mse_loss(x_rec.detach(), x)
    return cls + lambda_rec * rec, cls, mse


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


def trains_decoder_in_warm_up(cfg: RunConfig, server_round: int) -> bool:
    """Round 1's warm-up trains D too under the standard protocol (see the module doc)."""
    return server_round == 1 and cfg.rules.first_warmup_trains_decoder


class FusedSpaceFedTrainer(Trainer):
    def warm_up(self, model: SiteModel, job: LocalRound, optimizers: RoundOptimizers | None = None) -> float:
        """Re-align E_i to the new global decoder: D and C frozen, reconstruction loss only
        (in round 1 of the standard protocol D trains too: there is no global decoder yet)."""
        cfg = job.cfg
        model.train()
        set_trainable(model, False)
        set_trainable(model.encoder, True)
        params = list(model.encoder.parameters())
        if trains_decoder_in_warm_up(cfg, job.server_round):
            set_trainable(model.decoder, True)
            params += list(model.decoder.parameters())
        optimizers = optimizers or RoundOptimizers(cfg, job.extras)
        optimizer = optimizers.autoencoder("warmup", params)
        ramp = optimizers.autoencoder_ramp(optimizer)

        def step(x: torch.Tensor, _: torch.Tensor) -> float:
            loss = reconstruction_loss(model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ramp is not None:
                ramp.step()
            return loss.item()

        epochs = epochs_for_steps(job.data.train, cfg.warmup_epochs, cfg.batch_size, cfg.warmup_min_steps)
        try:
            loss, _ = run_epochs(job.data.train, epochs, cfg.batch_size, job.device, job.generator, step)
        finally:
            set_trainable(model, True)
        return loss

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        optimizers = RoundOptimizers(cfg, job.extras)
        anchor = l2sp_anchor(model, job.extras) if cfg.l2sp_lambda > 0 else None
        images = health_images(job.data.train).to(job.device)
        # what the site evaluates with: its own E_i and the received (averaged) decoder
        received = {f"{k}_received": v for k, v in fused_space_health(model, images).items()}
        warm_loss = self.warm_up(model, job, optimizers) if cfg.warmup_epochs > 0 else float("nan")
        health = (
            {f"{k}_warmup": v for k, v in fused_space_health(model, images).items()} if cfg.warmup_epochs > 0 else {}
        )
        model.train()

        # 2. Fused local training.
        ae_params = [*model.encoder.parameters(), *model.decoder.parameters()]
        ae_opt = optimizers.autoencoder("autoencoder", ae_params)
        ae_ramp = optimizers.autoencoder_ramp(ae_opt)
        cls_opt = optimizers.sgd("classifier", model.classifier.parameters(), cfg.lr)
        rec_total = 0.0

        def prior() -> torch.Tensor | float:
            return l2sp_penalty(model, anchor, cfg.l2sp_lambda) if anchor is not None else 0.0

        def fused_step(x: torch.Tensor, y: torch.Tensor) -> float:
            nonlocal rec_total
            if cfg.task_aware:
                total, cls, rec = task_aware_loss(model, x, y, loss_fn, cfg.lambda_rec, cfg.rec_loss)
                ae_opt.zero_grad(set_to_none=True)
                cls_opt.zero_grad(set_to_none=True)
                (total + prior()).backward()
                ae_opt.step()
                cls_opt.step()
                if ae_ramp is not None:
                    ae_ramp.step()
            else:
                rec, cls = decoupled_losses(model, x, y, loss_fn)
                ae_opt.zero_grad(set_to_none=True)
                (rec + prior()).backward()
                ae_opt.step()
                if ae_ramp is not None:
                    ae_ramp.step()
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
        metrics = {"train_loss": train_loss, "rec_loss": rec_total / max(steps, 1), **received, **health}
        metrics.update(fused_space_health(model, images))
        if cfg.warmup_epochs > 0:
            metrics["warmup_loss"] = warm_loss
        return RoundResult(metrics=metrics, extras=extras)
