"""FuseFL's server side (Tang et al., NeurIPS 2024; read from its public code, not copied).

The server stacks instead of averaging: in stage k each site's level-k block (and its
adapter) becomes that site's column of the fused level k, as sent. Each round's train
messages carry only the levels fused so far (core/stages.py decides the key sets, via
the method contract). In the calibration round (K+1) the fused model's head starts as
the plain mean of the sites' column heads (FuseFL's `avg` classifier) and is retrained on
synthetic features drawn per class from a Gaussian whose mean and covariance pool the
sites' statistics (FuseFL's CCVR-style step, with the covariance's mean term subtracted,
which the public code's pooling leaves out): `fusefl-calibration-samples` per class, one
pass, batch 128, SGD at the run's `lr` with momentum 0.9.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from core.methods import ARRAYS_RECORD, METRICS_RECORD, SITE_ID_KEY, Exchange
from strategies.base import BadReply, SharedModelStrategy

STATISTICS = ("mean", "moment", "count")
HEAD = "classifier.head"
#: the largest |feature mean| a site may report (its second moments: the square). The pooled
#: features are the head's inputs, O(1-100) after the model's normalisation; near 1e200,
#: mean**2 overflowed to inf, the moment check passed and the fused head turned NaN.
MAX_FEATURE = 1e6


class FuseFL(SharedModelStrategy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        (self.statistics,) = self.contract.to_server
        self.server_round = 0
        self.config: dict = self.settings  # the run's settings (fusefl-blocks, -columns, seed, lr)
        self.full: dict[str, np.ndarray] = {}
        self.column_of: dict[int, int] = {}  # node -> the column it claimed first (a column is one site's)

    @property
    def levels(self) -> int:
        return int(self.config["fusefl-blocks"])

    def calibrating(self) -> bool:
        return self.server_round == self.levels + 1

    # -- what travels ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send only the levels fused so far; remember the whole model for the stacking."""
        self.server_round = server_round
        columns, nodes = int(self.config["fusefl-columns"]), len(list(grid.get_node_ids()))
        if nodes != columns:
            raise ValueError(
                f"progressive fusion needs one site per column: fusefl-columns = {columns}, but {nodes} sites are "
                "connected"
            )
        self.full = {k: np.array(arrays[k].numpy()) for k in arrays.keys()}
        to_site, _ = self.contract.key_sets(sorted(self.shared_keys), server_round, None, self.config)
        subset = ArrayRecord({k: arrays[k] for k in to_site})
        return super().configure_train(server_round, subset, config, grid)

    def expected_reply_keys(self, msg: Message) -> frozenset[str]:
        node = msg.metadata.src_node_id
        site = msg.content.metric_records.get(METRICS_RECORD, {}).get(SITE_ID_KEY)
        if not isinstance(site, int) or isinstance(site, bool):
            raise BadReply(f"site (node {node}) sent no site-id, so its column is unknown")
        owner = next((n for n, c in self.column_of.items() if c == site and n != node), None)
        if owner is not None or self.column_of.setdefault(node, site) != site:
            raise BadReply(
                f"site (node {node}) claims column {site}, which "
                + (f"node {owner} holds" if owner is not None else f"differs from its column {self.column_of[node]}")
                + " (give each site its own partition-id)"
            )
        try:
            _, back = self.contract.key_sets(sorted(self.shared_keys), self.server_round, site, self.config)
        except ValueError as exc:
            raise BadReply(f"site (node {msg.metadata.src_node_id}): {exc}") from None
        return frozenset(back)

    def check_exchange(self, node: int, msg: Message, exchange: Exchange) -> None:
        """Empty in the stages; in the calibration round per-class mean (C, d), second
        moment (C, d, d) and count (C,), finite, counts non-negative."""
        record = msg.content.array_records.get(exchange.name)
        if record is None:
            raise BadReply(f"site (node {node}) sent no {exchange.meaning} (record {exchange.name!r})")
        keys = set(record.keys())
        if not self.calibrating():
            if keys:
                raise BadReply(f"site (node {node}) sent {exchange.meaning} before the calibration round")
            return
        if keys != set(STATISTICS):
            raise BadReply(f"site (node {node}) sent {exchange.meaning} {sorted(keys)}, expected {list(STATISTICS)}")
        mean, moment, count = (record[k].numpy() for k in STATISTICS)
        d = self.specs[f"{HEAD}.weight"].shape[1]
        classes = self.specs[f"{HEAD}.weight"].shape[0]
        if mean.shape != (classes, d) or moment.shape != (classes, d, d) or count.shape != (classes,):
            raise BadReply(f"site (node {node}) sent {exchange.meaning} of shapes that do not fit the model")
        self.check_arrays(node, exchange.name, record, None)
        if np.abs(mean).max(initial=0) > MAX_FEATURE or np.abs(moment).max(initial=0) > MAX_FEATURE**2:
            raise BadReply(
                f"site (node {node}) sent {exchange.meaning} beyond |mean| <= {MAX_FEATURE:g} (second moments "
                f"<= {MAX_FEATURE**2:g}): no feature of this model is that large"
            )
        examples = msg.content.metric_records.get(METRICS_RECORD, {}).get("num-examples")
        if (count < 0).any() or not np.array_equal(count, np.round(count)) or int(count.sum()) != examples:
            raise BadReply(
                f"site (node {node}) sent class counts that are not whole numbers adding up to its {examples} "
                "training examples"
            )
        variance = np.diagonal(moment, axis1=1, axis2=2) - mean**2
        if (variance < -1e-3 * (1 + np.abs(mean) ** 2)).any():
            raise BadReply(f"site (node {node}) sent second moments smaller than its means allow")

    # -- stacking and calibration --------------------------------------------------------
    def aggregate_arrays(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        out = {k: v.copy() for k, v in self.full.items()}
        for msg in replies:  # each site's own keys, as sent: its column of this level (or its head)
            record = msg.content[ARRAYS_RECORD]
            for key in record.keys():
                out[key] = np.array(record[key].numpy())
        if self.calibrating():
            self.calibrate(out, replies)
        return ArrayRecord({k: Array(v) for k, v in out.items()})

    def calibrate(self, arrays: dict[str, np.ndarray], replies: list[Message]) -> None:
        """The fused head: the mean of the column heads, retrained on pooled-Gaussian features."""
        heads = [
            {
                k.rsplit(".", 1)[1]: np.array(m.content[ARRAYS_RECORD][k].numpy())
                for k in m.content[ARRAYS_RECORD].keys()
            }
            for m in replies
        ]
        weight = np.mean([h["weight"] for h in heads], axis=0)
        bias = np.mean([h["bias"] for h in heads], axis=0)
        stats = [
            {k: np.array(m.content[self.statistics.name][k].numpy(), np.float64) for k in STATISTICS} for m in replies
        ]
        count = sum(s["count"] for s in stats)
        head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
            head.bias.copy_(torch.from_numpy(bias))
        seed = int(self.config.get("seed", 0))
        generator = np.random.default_rng(seed)
        features, labels = [], []
        for c in np.flatnonzero(count > 0):
            mean = sum(s["count"][c] * s["mean"][c] for s in stats) / count[c]
            moment = sum(s["count"][c] * s["moment"][c] for s in stats) / count[c]
            cov = moment - np.outer(mean, mean) + 1e-5 * np.eye(len(mean))
            cov = (cov + cov.T) / 2
            n = int(self.config.get("fusefl-calibration-samples", 500))
            features.append(generator.multivariate_normal(mean, cov, size=n, method="eigh"))
            labels.append(np.full(n, c))
        if features:
            x = torch.from_numpy(np.concatenate(features)).float()
            y = torch.from_numpy(np.concatenate(labels)).long()
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            optimizer = torch.optim.SGD(head.parameters(), lr=float(self.config.get("lr", 0.01)), momentum=0.9)
            for start in range(0, len(y), 128):
                idx = order[start : start + 128]
                loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        trained = head.weight.detach().numpy(), head.bias.detach().numpy()
        if not all(np.isfinite(t).all() for t in trained):  # a diverged retraining: keep the mean of the heads
            trained = weight, bias
        arrays[f"{HEAD}.weight"] = np.asarray(trained[0]).astype(arrays[f"{HEAD}.weight"].dtype)
        arrays[f"{HEAD}.bias"] = np.asarray(trained[1]).astype(arrays[f"{HEAD}.bias"].dtype)
