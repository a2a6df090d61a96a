"""A site whose evaluation split holds one image (100 breastmnist sites leave some with
one local test image) gets its metrics instead of a crash in medmnist's getACC."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.evaluation import evaluate_split
from partitions.tensors import TensorSplit


class Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.2, 0.8]]).repeat(len(x), 1)


def test_a_one_image_split_is_evaluated():
    split = TensorSplit(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), torch.tensor([1]))
    scores = evaluate_split(Constant(), split, "binary-class", torch.device("cpu"))
    assert scores["acc"] == 1.0 and scores["balanced_acc"] == 1.0
    wrong = TensorSplit(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), torch.tensor([0]))
    assert evaluate_split(Constant(), wrong, "binary-class", torch.device("cpu"))["acc"] == 0.0
    assert math.isnan(scores["auc"]) or 0.0 <= scores["auc"] <= 1.0
