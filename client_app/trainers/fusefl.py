"""FuseFL's site side (Tang et al., NeurIPS 2024; read from its public code, not copied):
one-shot federated learning by progressive fusion of the sites' blocks.

Round r <= K is stage k = r - 1: the site trains its own column from level k on (its
blocks, its adapter at level k over every column's level k-1 output, its final norm and
head) on top of the levels fused so far, which stay frozen (evaluation mode, no
gradients). Only its level k (and that adapter) is sent (core/stages.py); the rest of
its column stays here until its own stage. Round K+1 calibrates: the site sends its head
and, in the contract's exchange, per-class statistics (mean, second moment, count) of the
fused model's features on its training images, from which the server retrains the head.

The site evaluates its stage model until every level is fused, then the fused model
(`personal`).
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from torch import nn

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import RoundOptimizers, classification_loss, fast_inputs, run_epochs
from core.methods import contract_for
from core.stages import level_units
from models import SiteModel

STAGE, COLUMN = "fusefl/stage", "fusefl/column"  # extras: the last stage this site trained, its column


def trainable_modules(net, stage: int, column: int) -> list[nn.Module]:
    """What site `column` trains in `stage`: its units from that level on, its final norm
    and head, and its adapter at that level."""
    units = net.units(column)
    own = [units[u] for level in range(stage, net.levels) for u in level_units(net.levels)[level]]
    own += [net.columns[column].bn, net.columns[column].head]
    if stage > 0:
        own.append(net.adapters[stage - 1][column])
    return own


class FuseFLTrainer(Trainer):
    def personal(self, model: SiteModel, extras: dict[str, torch.Tensor]) -> nn.Module:
        """Before every level is fused: the site's stage model; after: the fused model."""
        from models.fused_columns import StageModel

        net = model.classifier
        if STAGE not in extras or int(extras[STAGE]) >= net.levels:
            return model
        return StageModel(net, int(extras[STAGE]), int(extras[COLUMN]))

    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, net, column = job.cfg, model.classifier, job.site_id
        if not 0 <= column < len(net.columns):
            raise ValueError(f"site {column} has no column: fusefl-columns = {len(net.columns)}")
        if job.data.spec.multi_label:  # refused before any stage is spent: calibration is per class
            raise ValueError("FuseFL's calibration is per class; this dataset is multi-label")
        stage = job.server_round - 1
        if stage >= net.levels:
            return self.calibration_statistics(model, job)
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()  # the fused levels are frozen, their BatchNorm statistics too
        modules = trainable_modules(net, stage, column)
        params = [p for m in modules for p in m.parameters()]
        for m in modules:
            m.train()
        for p in params:
            p.requires_grad_(True)
        optimizers = RoundOptimizers(cfg, job.extras)
        optimizer = optimizers.sgd(f"column-{stage}", params, cfg.lr)  # each stage trains other parameters
        loss_fn = classification_loss(job.data.spec.multi_label)
        head = net.columns[column].head

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            loss = loss_fn(head(net.stage_features(x, stage, column)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        train_loss, _ = run_epochs(job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, step)
        for p in net.parameters():
            p.requires_grad_(True)
        (statistics,) = contract_for(cfg.method).to_server
        return RoundResult(
            metrics={"train_loss": train_loss, "stage": float(stage)},
            extras={STAGE: torch.tensor(stage), COLUMN: torch.tensor(column), **optimizers.saved()},
            outgoing=RecordDict({statistics.name: statistics.build({})}),
        )

    @torch.no_grad()
    def calibration_statistics(self, model: SiteModel, job: LocalRound) -> RoundResult:
        """Per-class mean, second moment and count of the fused model's features on the
        site's training images (what the server calibrates the head from)."""
        net, classes = model.classifier, job.data.spec.num_classes
        net.eval()
        d = net.feature_dim
        total, moment, count = torch.zeros(classes, d), torch.zeros(classes, d, d), torch.zeros(classes)
        for x, y in job.data.train.batches(256):
            f = net.features(fast_inputs(x, job.device)).double().cpu()
            y = y.long().view(-1)
            total.index_add_(0, y, f.float())
            moment.index_add_(0, y, torch.einsum("ni,nj->nij", f, f).float())
            count.index_add_(0, y, torch.ones(len(y)))
        seen = count.clamp_min(1)
        (statistics,) = contract_for(job.cfg.method).to_server
        record = statistics.build(
            {"mean": total / seen[:, None], "moment": moment / seen[:, None, None], "count": count}
        )
        return RoundResult(
            metrics={"calibration_images": float(count.sum())},
            extras={STAGE: torch.tensor(net.levels), COLUMN: torch.tensor(job.site_id)},
            outgoing=RecordDict({statistics.name: record}),
        )
