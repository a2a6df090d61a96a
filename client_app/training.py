"""What every method's local training shares: losses, optimisers, epochs, gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from core.config import RunConfig
from partitions.tensors import TensorSplit


def classification_loss(multi_label: bool) -> nn.Module:
    """CE for single-label tasks, BCE-with-logits for multi-label (ChestMNIST)."""
    return nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()


def sgd(params: Iterable[nn.Parameter], lr: float, cfg: RunConfig) -> torch.optim.SGD:
    """The reference optimiser: SGD with momentum and weight decay, constant lr."""
    return torch.optim.SGD(list(params), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_epochs(
    data: TensorSplit,
    epochs: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    step: Callable[[torch.Tensor, torch.Tensor], float],
) -> tuple[float, int]:
    """Call `step(x, y) -> loss` over `epochs` shuffled passes; return (mean loss, steps)."""
    total, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in data.batches(batch_size, generator):
            total += step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            steps += 1
    return total / max(steps, 1), steps


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def classifier_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, fused_input: bool
) -> torch.Tensor:
    """Flat gradient of the classification loss over the classifier's parameters.

    With `fused_input` the classifier sees x + D(E_i(x)); otherwise the original x.
    BatchNorm uses batch statistics (train mode) as in training, but the running
    statistics are restored so that measuring leaves the model untouched.
    """
    classifier = model.classifier
    saved = {k: v.clone() for k, v in classifier.state_dict().items()}
    model.train()
    with torch.no_grad():
        inputs = x + model.reconstruct(x) if fused_input else x
    classifier.zero_grad(set_to_none=True)
    loss = loss_fn(classifier(inputs), y)
    grads = torch.autograd.grad(loss, [p for p in classifier.parameters()])
    classifier.load_state_dict(saved)
    return torch.cat([g.reshape(-1) for g in grads]).detach().cpu()
