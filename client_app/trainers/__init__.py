"""One client-side trainer per method."""

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from client_app.trainers.fedavg import FedAvgTrainer
from client_app.trainers.fedbn import FedBNTrainer
from client_app.trainers.fedprox import FedProxTrainer
from client_app.trainers.fusedspacefed import FusedSpaceFedTrainer
from client_app.trainers.scaffold import ScaffoldTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "fusedspacefed": FusedSpaceFedTrainer,
    "fedavg": FedAvgTrainer,
    "fedprox": FedProxTrainer,
    "scaffold": ScaffoldTrainer,
    "fedbn": FedBNTrainer,
}


def trainer_for(method: str) -> Trainer:
    if method not in TRAINERS:
        raise NotImplementedError(f"method {method!r} has no client trainer yet; available: {sorted(TRAINERS)}")
    return TRAINERS[method]()


__all__ = ["LocalRound", "RoundResult", "Trainer", "TRAINERS", "trainer_for"]
