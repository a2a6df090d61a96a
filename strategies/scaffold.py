"""SCAFFOLD's server side (Karimireddy et al. 2020, option II; method.md section 2).

State: the server control variate c, one array per classifier parameter, zeros at the
start (kept empty until the first replies, which sites read as zeros).

- configure_train: every train message also carries c (the contract's `to_site` record).
- aggregate_train: the model is `w_global += mean_i(dw_i)` with global step 1, which
  is the mean of the sites' models since they all start from w_global; the mean is
  example-weighted when `weighted` is true (the default, as for every method here)
  and the paper's plain mean with `weighted = false`. The control variate follows the
  paper exactly, with a plain mean whatever `weighted` says (so that c stays the mean
  of the sites' c_i): `c += (|S| / N) * mean_{i in S}(dc_i)`, |S| = sites that
  replied, N = sites connected when the round was configured.

Sites send dc_i, never c_i; a reply with any other extra record, or a dc_i over keys other
than the shared parameters, is refused. Both records are the method contract's exchanges
(`to_site`: c, `to_server`: dc_i), built and checked there; the base strategy checks every
reply's exchanges (`exchange_keys` says which keys they cover).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.base import SharedModelStrategy

STATE_PREFIX = "control/"


class Scaffold(SharedModelStrategy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        (self.control_out,) = self.contract.to_site  # c, to every site
        (self.control_in,) = self.contract.to_server  # dc_i, from every site
        self.control: dict[str, np.ndarray] = {}
        self.num_nodes = 0

    # -- state -----------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, np.ndarray]:
        return {STATE_PREFIX + k: v.copy() for k, v in self.control.items()}

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        wrong = sorted(
            k for k in state if not k.startswith(STATE_PREFIX) or k[len(STATE_PREFIX) :] not in self.shared_keys
        )
        if wrong:
            raise ValueError(f"not a SCAFFOLD control variate of this model: {wrong[:3]}")
        self.control = {k[len(STATE_PREFIX) :]: np.array(v, copy=True) for k, v in state.items()}

    # -- rounds ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_nodes = len(list(grid.get_node_ids()))
        # The parent hands every message the same RecordDict: give them all one new
        # RecordDict with c added, leaving the caller's records untouched.
        if messages:
            content = RecordDict(dict(messages[0].content.items()))
            content[self.control_out.name] = self.control_out.build(self.control)
            for msg in messages:
                msg.content = content
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        keys = self.exchange_keys()
        updates = [_numpy(self.control_in.read(m.content, keys)) for m in replies]
        keys = set(updates[0])
        if any(set(u) != keys for u in updates):
            raise ValueError("sites sent control variate updates over different parameters")
        if self.control and set(self.control) != keys:
            raise ValueError("the sites' control variate updates do not match the server's control variate")
        scale = len(updates) / max(self.num_nodes, len(updates))
        for key in sorted(keys):  # one order in every process (a set's follows the string hash seed)
            mean_dc = np.mean([u[key].astype(np.float64) for u in updates], axis=0)
            current = self.control.get(key, np.zeros_like(mean_dc))
            self.control[key] = (current + scale * mean_dc).astype(updates[0][key].dtype)
        norm = float(np.sqrt(sum(float((self.control[k].astype(np.float64) ** 2).sum()) for k in sorted(self.control))))
        metrics["control_norm"] = norm
        return arrays, metrics

    def exchange_keys(self) -> set[str]:
        """dc_i covers the keys of c once it exists, the shared parameters before."""
        return set(self.control) or self.parameter_keys()


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(record[k].numpy()) for k in record.keys()}
