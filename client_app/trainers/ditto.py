"""Ditto's local round (Li et al. 2021): FedAvg for the global model w, plus a personal
model v that never leaves the site, trained on `min_v loss(v) + mu/2 ||v - w||^2` with w
the global model just received (`ditto-mu`, `ditto-personal-epochs`). As in PFLlib's
clientditto, v is trained first, then w for `local-epochs` exactly as FedAvg trains it.

v is the whole classifier (weights and BatchNorm statistics), kept in the site's private
extras under `personal/`; before a site's first round v starts as the global model. The
site evaluates v (`personal`, the contract's `personal_model`), so Ditto's accuracies are
those of the personalised models.
"""

from __future__ import annotations

import copy

import torch

from client_app.trainers.base import LocalRound, RoundResult
from client_app.trainers.fedavg import FedAvgTrainer
from client_app.training import RoundOptimizers, classification_loss, run_epochs
from models import SiteModel

PERSONAL = "personal/"  # extras entries `personal/<classifier state_dict key>`: v


class DittoTrainer(FedAvgTrainer):
    def personal(self, model: SiteModel, extras: dict[str, torch.Tensor]) -> SiteModel:
        """A copy of `model` with the site's v as its classifier (the global model before v exists)."""
        v = {k[len(PERSONAL) :]: t for k, t in extras.items() if k.startswith(PERSONAL)}
        personal = copy.deepcopy(model)
        if v:
            expected = personal.classifier.state_dict()
            if set(v) != set(expected) or any(v[k].shape != expected[k].shape for k in v):
                raise ValueError("the saved personal model v does not fit this run's classifier")
            personal.classifier.load_state_dict(v)
        return personal

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        personal = self.personal(model, job.extras)
        personal.train()
        w_global = [p.detach().clone() for p in model.classifier.parameters()]
        optimizers = RoundOptimizers(cfg, job.extras)
        optimizer = optimizers.sgd("personal", personal.classifier.parameters(), cfg.lr)
        params = list(personal.classifier.parameters())

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            loss = loss_fn(personal.classifier(x), y)
            pull = sum(((p - w) ** 2).sum() for p, w in zip(params, w_global))
            optimizer.zero_grad(set_to_none=True)
            (loss + 0.5 * cfg.ditto_mu * pull).backward()
            optimizer.step()
            return loss.item()

        personal_loss, _ = run_epochs(
            job.data.train, cfg.ditto_personal_epochs, cfg.batch_size, job.device, job.generator, step
        )
        result = super().train(model, job)  # w: FedAvg's local round
        v = {PERSONAL + k: t.detach().cpu().clone() for k, t in personal.classifier.state_dict().items()}
        result.metrics["personal_loss"] = personal_loss
        result.extras = {**result.extras, **optimizers.saved(), **v}
        return result
