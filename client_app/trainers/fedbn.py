"""FedBN's local round: FedAvg's training, but the classifier's BatchNorm layers
(weights, biases and running statistics) never leave the site.

Everything not in `shared_keys` is private state: the ClientApp saves it after the
round (memory and disk) and restores it over the global arrays at the next message,
so each site keeps its own BatchNorm, in training and in evaluation.
"""

from __future__ import annotations

from client_app.trainers.fedavg import FedAvgTrainer
from models import SiteModel, is_batchnorm_key


class FedBNTrainer(FedAvgTrainer):
    def shared_keys(self, model: SiteModel) -> list[str]:
        return [k for k in super().shared_keys(model) if not is_batchnorm_key(model, k)]
