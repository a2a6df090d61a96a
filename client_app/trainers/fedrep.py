"""FedRep's local round (Collins et al. 2021): the body is shared and averaged, each site
keeps its own head. A round first fits the head to the received body (`fedrep-head-epochs`,
body frozen), then trains the body with the new head frozen (`local-epochs`), as PFLlib's
clientrep does. The head is the contract's `HEAD` (the linear layer and the last
`head-blocks` residual blocks); which keys leave the site is the contract's business.

FedPer shares the same parts but trains body and head together, which is FedAvg's loop,
so it needs no trainer of its own.

"Frozen" means no gradient step: the whole model stays in training mode, as in PFLlib, so
the frozen part's BatchNorm running statistics still follow the batches (with `norm =
batch-recal` each site recomputes them before it evaluates anyway).
"""

from __future__ import annotations

import torch

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import RoundOptimizers, classification_loss, run_epochs
from core.methods import HEAD, KeySet
from models import CLASSIFIER, SiteModel


def head_parameters(model: SiteModel, head_blocks: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(head, body) parameters of the classifier."""
    named = {f"{CLASSIFIER}.{name}": p for name, p in model.classifier.named_parameters()}
    head = set(KeySet((HEAD,)).select(named, head_blocks))
    return [p for k, p in named.items() if k in head], [p for k, p in named.items() if k not in head]


class FedRepTrainer(Trainer):
    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, loss_fn = job.cfg, classification_loss(job.data.spec.multi_label)
        head, body = head_parameters(model, cfg.head_blocks)
        optimizers = RoundOptimizers(cfg, job.extras)
        model.train()
        losses = {}
        for phase, params, frozen, epochs in (
            ("head", head, body, cfg.fedrep_head_epochs),
            ("body", body, head, cfg.local_epochs),
        ):
            for p in frozen:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            optimizer = optimizers.sgd(phase, params, cfg.lr)

            def step(x: torch.Tensor, y: torch.Tensor, optimizer=optimizer) -> float:
                loss = loss_fn(model.classifier(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.item()

            losses[phase], _ = run_epochs(job.data.train, epochs, cfg.batch_size, job.device, job.generator, step)
        for p in head + body:
            p.requires_grad_(True)
        return RoundResult(
            metrics={"train_loss": losses["body"], "head_loss": losses["head"]}, extras=optimizers.saved()
        )
