"""The server side of each method: `base.SharedModelStrategy` (FedAvg over the shared
arrays, with reply checks and Gamma) and, where a method's server does more, its own
module (`scaffold.py`). `core.methods` names which one a method uses."""

from flwr.app import ArrayRecord

from core.config import RunConfig
from core.methods import contract_for
from strategies.base import BadReply, PrivacyViolation, SharedModelStrategy


def build_strategy(cfg: RunConfig, initial_arrays: ArrayRecord) -> SharedModelStrategy:
    """The strategy the run's method contract names, for the run's settings."""
    contract = contract_for(cfg.method)
    return contract.load_strategy_class()(
        contract,
        initial_arrays,
        weighted=cfg.weighted_mean,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_replies,
        min_available_nodes=cfg.min_replies,  # a round goes on without sites that are down
        dp_clip_norm=cfg.dp_clip_norm,
        dp_noise_multiplier=cfg.dp_noise_multiplier,
        dp_delta=cfg.dp_delta,
        expects_gradients=cfg.measure_gamma,
        aggregation=cfg.aggregation,
        trim_fraction=cfg.trim_fraction,
        krum_byzantine=cfg.krum_byzantine,
        max_update_norm=cfg.max_update_norm,
        max_examples=cfg.max_examples,
        secure=cfg.secure_aggregation,
        settings=cfg.to_mapping(),
    )


__all__ = ["BadReply", "PrivacyViolation", "SharedModelStrategy", "build_strategy"]
