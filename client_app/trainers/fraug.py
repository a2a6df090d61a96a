"""FRAug's local round (Chen et al., ICCV 2023; read from its public code, not copied):
feature-representation augmentation. Three steps per mini-batch, each with its own optimiser:

1. the model: `(1 - r) CE(real) + r CE(head(augmented))`, `r = min(0.5, exp(gamma (t - T)))`
   with t the round and T the run's rounds (at gamma 0.01 a half in a run's last 69 rounds,
   so in every round of a short run); the augmented features are made without
   gradients (so they train the head only) in two branches averaged, as the code's
   `use_homo_label_aug = 2`: balanced labels with the class means as reference, and the
   batch's labels with its real features as reference. The class means (momentum 0.3) are
   updated from the real features;
2. the generator G: `CE(head(G(z, y)), y) - lambda_G dist_G` (the distance is maximised:
   diverse features), on balanced labels (over the classes this site has seen: an unseen
   class has no mean), uniform noise. `fraug-distance-g`: `mse`, MSE(G(z, y), mean_y), or
   `mmd`, kernel MMD between the generated batch and the batch's real features (the code's
   MMD choice compares with the real features, not the class means);
3. the transformation T: `-H(softmax(head(T(.)))) + lambda_FT dist_FT(T(.), reference)` on
   both branches, G's output detached; `fraug-distance-ft`: `mse` or `mmd` (kernel MMD
   between the transformed batch and its references).

What leaves the site is the contract's business: the classifier and G (BatchNorm running
statistics excluded); T, the class means and the statistics stay here. The model's optimiser
is the project's (SGD at `lr`, the recipe's schedule); G and T use FRAug's SGD (momentum
0.5) at `fraug-lr-aux`. docs/methods/fraug.md says what we chose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.training import RoundOptimizers, run_epochs
from models import SiteModel

CLASS_MEANS = "fraug/class-means"  # extras: (classes, feature_dim), private
CLASS_SEEN = "fraug/class-seen"  # extras: (classes,) images of each class this site has seen
MEAN_MOMENTUM = 0.3


def augmentation_share(cfg, server_round: int) -> float:
    """r = min(0.5, exp(gamma (t - T))): half once T - t < ln 2 / gamma (69 rounds at gamma
    0.01), smaller before; a run of fewer rounds than that uses a half from its start."""
    return min(0.5, math.exp(cfg.fraug_gamma * (server_round - cfg.num_server_rounds)))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy of a batch."""
    p = torch.softmax(logits, dim=1)
    return -(p * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def kernel_mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, ratio: float = 2.0) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples (rows) under a sum of Gaussian
    kernels, the biased estimate mean(k(x, x')) + mean(k(y, y')) - 2 mean(k(x, y)).
    Bandwidths: the pooled sample's mean squared pairwise distance (off the diagonal, taken
    as a constant) times ratio^(i - kernels // 2), i < kernels: the multi-kernel form of
    FRAug's `MMD_kernel` (and of deep domain adaptation generally)."""
    pooled = torch.cat([x, y])
    squares = pooled.pow(2).sum(dim=1)
    distances = (squares[:, None] + squares[None, :] - 2 * pooled @ pooled.T).clamp_min(0)
    n = len(pooled)
    base = distances.detach().sum() / max(n * n - n, 1)
    base = base.clamp_min(1e-12) / ratio ** (kernels // 2)
    gram = sum(torch.exp(-distances / (base * ratio**i)) for i in range(kernels))
    k = len(x)
    return gram[:k, :k].mean() + gram[k:, k:].mean() - 2 * gram[:k, k:].mean()


def distance(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`fraug-distance-g` / `fraug-distance-ft`: mean squared error or kernel MMD."""
    if kind == "mse":
        return nn.functional.mse_loss(x, y)
    if kind == "mmd":
        return kernel_mmd(x, y)
    raise ValueError(f"unknown FRAug distance {kind!r}: choose 'mse' or 'mmd'")


def update_class_means(means: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> None:
    """mean_c <- 0.7 mean_c + 0.3 (this batch's mean of class c), for the classes present."""
    for c in torch.unique(y):
        means[c] = (1 - MEAN_MOMENTUM) * means[c] + MEAN_MOMENTUM * features[y == c].mean(dim=0)


class FRAugTrainer(Trainer):
    def train(self, model: SiteModel, job: LocalRound) -> RoundResult:
        cfg, spec = job.cfg, job.data.spec
        if spec.multi_label:
            raise ValueError("FRAug augments single-label classes; this dataset is multi-label")
        if model.aux is None:
            raise ValueError("FRAug needs its generator and transformation (the contract's aux modules)")
        classifier, generator, transform = model.classifier, model.aux["generator"], model.aux["transform"]
        num_classes = spec.num_classes
        means = job.extras.get(CLASS_MEANS)
        if means is None or tuple(means.shape) != (num_classes, classifier.feature_dim):
            means = torch.zeros(num_classes, classifier.feature_dim)
        means = means.to(job.device).clone()
        seen = job.extras.get(CLASS_SEEN)
        if seen is None or tuple(seen.shape) != (num_classes,):
            seen = torch.zeros(num_classes)
        seen = seen.clone()
        share = augmentation_share(cfg, job.server_round)
        optimizers = RoundOptimizers(cfg, job.extras)
        model_opt = optimizers.sgd("classifier", classifier.parameters(), cfg.lr)
        aux_cfg = cfg.replace(momentum=0.5, weight_decay=0.0)
        g_opt = optimizers.sgd("generator", generator.parameters(), cfg.fraug_lr_aux, aux_cfg)
        t_opt = optimizers.sgd("transform", transform.parameters(), cfg.fraug_lr_aux, aux_cfg)
        ce = nn.CrossEntropyLoss()
        noise = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=job.generator)))
        losses = {"generator_loss": 0.0, "transform_loss": 0.0}
        steps = [0]

        def draw(n: int) -> torch.Tensor:
            return torch.rand(n, generator.latent_dim, generator=noise).to(job.device)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            n = len(y)
            seen.index_add_(0, y.long().cpu(), torch.ones(n))
            # balanced labels over the classes this site has seen: a class it never saw has no
            # mean feature to anchor the augmentation (under a skewed partition, most classes)
            present = torch.nonzero(seen > 0).flatten()
            balanced = present[torch.arange(n) % len(present)].to(job.device)
            # 1. the model, on real and (gradient-free) augmented features
            classifier.train()
            generator.eval()
            transform.eval()
            real = classifier.features(x)
            loss_real = ce(classifier.head(real), y)
            update_class_means(means, real.detach(), y)
            loss = loss_real
            if n > 1 and share > 0:
                with torch.no_grad():
                    fake_a = transform(generator(draw(n), balanced), means[balanced], balanced)
                    fake_b = transform(generator(draw(n), y), real.detach(), y)
                loss_fake = 0.5 * (ce(classifier.head(fake_a), balanced) + ce(classifier.head(fake_b), y))
                loss = (1 - share) * loss_real + share * loss_fake
            model_opt.zero_grad(set_to_none=True)
            loss.backward()
            model_opt.step()
            if n > 1:  # BatchNorm1d in G and T needs two samples
                # 2. the generator: classifiable, and far from the class means
                classifier.eval()
                generator.train()
                fake = generator(draw(n), balanced)
                anchor = real.detach() if cfg.fraug_distance_g == "mmd" else means[balanced]
                g_loss = ce(classifier.head(fake), balanced) - cfg.fraug_lambda_g * distance(
                    cfg.fraug_distance_g, fake, anchor
                )
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                # 3. the transformation: uncertain predictions, close to its reference
                generator.eval()
                transform.train()
                with torch.no_grad():
                    raw_a, raw_b = generator(draw(n), balanced), generator(draw(n), y)
                t_loss = 0.0
                for raw, reference, labels in ((raw_a, means[balanced], balanced), (raw_b, real.detach(), y)):
                    moved = transform(raw, reference, labels)
                    t_loss = t_loss + 0.5 * (
                        -entropy(classifier.head(moved))
                        + cfg.fraug_lambda_ft * distance(cfg.fraug_distance_ft, moved, reference)
                    )
                t_opt.zero_grad(set_to_none=True)
                t_loss.backward()
                t_opt.step()
                losses["generator_loss"] += g_loss.item()
                losses["transform_loss"] += t_loss.item()
                steps[0] += 1
            classifier.zero_grad(set_to_none=True)
            return loss_real.item()

        train_loss, _ = run_epochs(job.data.train, cfg.local_epochs, cfg.batch_size, job.device, job.generator, step)
        classifier.train()
        metrics = {"train_loss": train_loss, "augmentation_share": share}
        metrics.update({k: v / max(steps[0], 1) for k, v in losses.items()})
        return RoundResult(metrics=metrics, extras={CLASS_MEANS: means.cpu(), CLASS_SEEN: seen, **optimizers.saved()})
