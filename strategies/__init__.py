"""One server-side strategy per method, all built on Flower's FedAvg."""

from strategies.base import PrivacyViolation, SharedModelStrategy
from strategies.fedavg import FedAvgBaseline
from strategies.fedbn import FedBNBaseline
from strategies.fedprox import FedProxBaseline
from strategies.fusedspacefed import FusedSpaceFed
from strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[SharedModelStrategy]] = {
    "fusedspacefed": FusedSpaceFed,
    "fedavg": FedAvgBaseline,
    "fedprox": FedProxBaseline,
    "scaffold": Scaffold,
    "fedbn": FedBNBaseline,
}


def strategy_class(method: str) -> type[SharedModelStrategy]:
    if method not in STRATEGIES:
        raise NotImplementedError(f"method {method!r} has no strategy yet; available: {sorted(STRATEGIES)}")
    return STRATEGIES[method]


__all__ = ["PrivacyViolation", "SharedModelStrategy", "STRATEGIES", "strategy_class"]
