"""What every method's server side shares, built on Flower's FedAvg.

The strategy knows the shared key set (the keys of the initial global arrays) and
refuses any reply whose arrays carry anything else: a private encoder or a control
variate arriving at the server is a privacy bug, and the run stops on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import average_arrays, mean_metrics
from strategies.gamma import gamma, gamma_decomposition

WEIGHT_KEY = "num-examples"
BOOKKEEPING = {WEIGHT_KEY, "site-id", "restored"}


class PrivacyViolation(RuntimeError):
    """A site sent something that must never leave it."""


class SharedModelStrategy(FedAvg):
    """FedAvg over a fixed set of shared keys, with Gamma and per-site evaluation metrics."""

    #: array records a reply may carry besides the shared arrays
    allowed_records: frozenset[str] = frozenset({"arrays", "gradients"})

    def __init__(
        self,
        shared_keys: Iterable[str],
        *,
        weighted: bool = True,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        eval_every: int = 1,
        num_rounds: int = 1,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_train_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=WEIGHT_KEY,
        )
        self.shared_keys = frozenset(shared_keys)
        self.weighted = weighted
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.failures: dict[int, list[str]] = {}

    # -- strategy state (server checkpoints) -------------------------------------
    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Server-side state beyond the global arrays that a resumed run needs (e.g.
        SCAFFOLD's control variate). Stateless strategies return an empty dict."""
        return {}

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of `checkpoint_state`."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)[:3]}")

    # -- checks ---------------------------------------------------------------
    def check_reply(self, msg: Message) -> None:
        """Refuse replies that carry private arrays or records nobody asked for."""
        node = msg.metadata.src_node_id
        extra_records = set(msg.content.array_records) - self.allowed_records
        if extra_records:
            raise PrivacyViolation(f"site (node {node}) sent unexpected array records {sorted(extra_records)}")
        if "arrays" not in msg.content.array_records:
            raise PrivacyViolation(f"site (node {node}) sent no shared arrays")
        keys = set(msg.content["arrays"].keys())
        outside = keys - self.shared_keys
        if outside:
            raise PrivacyViolation(
                f"site (node {node}) sent {len(outside)} arrays outside the shared set, e.g. {sorted(outside)[:3]}; "
                "private state (encoder, control variates) must never leave a site"
            )
        if keys != self.shared_keys:
            raise ValueError(f"site (node {node}) is missing shared arrays {sorted(self.shared_keys - keys)[:3]}")

    def _split(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        valid, failed = [], []
        for msg in replies:
            (failed if msg.has_error() else valid).append(msg)
        self.failures[server_round] = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed]
        # A fixed order makes float sums, and so whole runs, repeatable whatever the arrival order.
        return sorted(valid, key=_reply_order)

    def weights(self, replies: list[Message]) -> list[float]:
        if not self.weighted:
            return [1.0] * len(replies)
        return [float(m.content["metrics"][WEIGHT_KEY]) for m in replies]

    # -- training ---------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._split(server_round, replies)
        if not valid:
            return None, None
        for msg in valid:
            self.check_reply(msg)
        weights = self.weights(valid)
        arrays = self.aggregate_arrays(server_round, valid, weights)
        metrics = mean_metrics([m.content["metrics"] for m in valid], weights, skip=BOOKKEEPING)
        metrics["num_replies"] = len(valid)
        metrics.update(self.gradient_dissimilarity(valid))
        return arrays, MetricRecord(metrics)

    def aggregate_arrays(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        return average_arrays([m.content["arrays"] for m in replies], weights)

    @staticmethod
    def gradient_dissimilarity(replies: list[Message]) -> dict[str, float]:
        grads = [m.content["gradients"] for m in replies if "gradients" in m.content.array_records]
        if len(grads) != len(replies) or not grads:
            return {}
        original = [_tensor(g["orig"]) for g in grads]
        if all("fused" in g for g in grads):
            return gamma_decomposition(original, [_tensor(g["fused"]) for g in grads])
        return {"gamma": gamma(original)}

    # -- evaluation -------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        due = server_round % self.eval_every == 0 or server_round == self.num_rounds
        return super().configure_evaluate(server_round, arrays, config, grid) if due else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None
        records = [m.content["metrics"] for m in valid]
        metrics = mean_metrics(records, [1.0] * len(records), skip=BOOKKEEPING)
        test_acc = [float(r["test_acc"]) for r in records]
        metrics.update(
            {
                "global_acc_mean": float(np.mean(test_acc)),
                "global_acc_worst": float(np.min(test_acc)),
                "local_acc_mean": metrics.get("local_acc", float("nan")),
                "macro_f1": metrics.get("test_macro_f1", float("nan")),
                "balanced_acc": metrics.get("test_balanced_acc", float("nan")),
                "auc": metrics.get("test_auc", float("nan")),
                "val_acc_mean": metrics.get("val_acc", float("nan")),
                "num_evaluated": len(valid),
            }
        )
        return MetricRecord(metrics)


def _reply_order(msg: Message) -> tuple[int, int]:
    metrics = msg.content.metric_records.get("metrics", {})
    return int(metrics.get("site-id", 0)), int(msg.metadata.src_node_id)


def _tensor(array: Array) -> torch.Tensor:
    return torch.from_numpy(np.array(array.numpy()))
