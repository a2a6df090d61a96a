"""What every method's local training shares: losses, optimisers, epochs, gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

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


def fast_inputs(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to `device`; on the CPU in channels_last layout, which trains the
    pre-activation ResNet-20 1.3-1.4x and the fused model 1.2-1.3x faster here
    (benchmarks/kernels.py; the models are switched to it by `fast_layout`)."""
    x = x.to(device, non_blocking=True)
    if device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextmanager
def fast_layout(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Train in channels_last on the CPU (see `fast_inputs`), back to the default layout after."""
    if device.type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


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
            total += step(fast_inputs(x, device), y.to(device, non_blocking=True))
            steps += 1
    return total / max(steps, 1), steps


def epochs_for_steps(data: TensorSplit, epochs: int, batch_size: int, min_steps: int) -> int:
    """`epochs`, or more whole epochs when they give fewer than `min_steps` batches (a small
    site's warm-up: 108 images at batch 32 are 4 steps an epoch)."""
    per_epoch = max(math.ceil(len(data) / batch_size), 1)
    return max(epochs, math.ceil(min_steps / per_epoch)) if epochs > 0 else 0


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


# -- optimisers kept across rounds (the reference protocol) ----------------------------

OPTIMIZER_EXTRAS = "optimizer"  # extras entries `optimizer/<name>/<param index>`: momentum buffers


class RoundOptimizers:
    """A round's SGD optimisers. Under the reference protocol each one's momentum buffers
    come from the site's private extras and go back into them after the round (the weights
    are replaced by the aggregate, the buffers carry over, as in the reference code)."""

    def __init__(self, cfg: RunConfig, extras: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.keep = cfg.rules.keeps_optimizer_state
        self.extras = extras
        self.optimizers: dict[str, torch.optim.SGD] = {}

    def sgd(
        self, name: str, params: Iterable[nn.Parameter], lr: float, cfg: RunConfig | None = None
    ) -> torch.optim.SGD:
        optimizer = sgd(params, lr, cfg or self.cfg)
        self.optimizers[name] = optimizer
        if self.keep:
            prefix = f"{OPTIMIZER_EXTRAS}/{name}/"
            saved = {int(k[len(prefix) :]): v for k, v in self.extras.items() if k.startswith(prefix)}
            if saved:
                state = optimizer.state_dict()
                params_in_order = [p for group in optimizer.param_groups for p in group["params"]]
                for index, buffer in saved.items():
                    if index >= len(params_in_order) or buffer.shape != params_in_order[index].shape:
                        raise ValueError(f"the saved {name} optimiser state does not fit this model (entry {index})")
                    state["state"][index] = {"momentum_buffer": buffer.to(params_in_order[index].device)}
                optimizer.load_state_dict(state)
        return optimizer

    def autoencoder(self, name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The autoencoder's optimiser (`ae-optimizer`): Adam at `lr-ae` without weight
        decay (fresh every round), or the reference code's SGD."""
        if self.cfg.ae_optimizer == "adam":
            optimizer = torch.optim.Adam(list(params), lr=self.cfg.lr_ae)
            self.optimizers[name] = optimizer
            return optimizer
        return self.sgd(name, params, self.cfg.lr_ae)

    def autoencoder_ramp(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The linear warm-up of a fresh Adam's learning rate over `ae-lr-ramp` steps (step it
        after each optimiser step). A fresh Adam moves every weight by about `lr-ae` on its
        first steps, whatever its gradient: on a trained autoencoder that knocked R^2 from
        0.55 to -0.81 within 6 steps (docs/recipe.md). None without Adam or with no ramp."""
        if self.cfg.ae_optimizer != "adam" or self.cfg.ae_lr_ramp <= 0:
            return None
        ramp = self.cfg.ae_lr_ramp
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / ramp))

    def saved(self) -> dict[str, torch.Tensor]:
        """The extras to keep (empty unless the optimisers persist)."""
        if not self.keep:
            return {}
        out = {}
        for name, optimizer in self.optimizers.items():
            for index, state in optimizer.state_dict()["state"].items():
                buffer = state.get("momentum_buffer")
                if buffer is not None:
                    out[f"{OPTIMIZER_EXTRAS}/{name}/{index}"] = buffer.detach().cpu().clone()
        return out


def own_extras(extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trainer's own extras, without the optimiser state kept beside them."""
    return {k: v for k, v in extras.items() if not k.startswith(OPTIMIZER_EXTRAS + "/")}
