"""One client-side trainer per method; `core.methods` names which one a method uses."""

from client_app.trainers.base import LocalRound, RoundResult, Trainer
from core.methods import contract_for


def trainer_for(method: str) -> Trainer:
    """The trainer the method contract names (imported only when a run asks for it)."""
    return contract_for(method).load_trainer()


__all__ = ["LocalRound", "RoundResult", "Trainer", "trainer_for"]
