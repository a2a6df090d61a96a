"""SCAFFOLD's server side (Karimireddy et al. 2020, option II; method.md section 2).

State: the server control variate c, one array per classifier parameter, zeros at the
start (kept empty until the first replies, which sites read as zeros).

- configure_train: every train message also carries c in the `scaffold-c` record.
- aggregate_train: the model is `w_global += mean_i(dw_i)` with global step 1, which
  is the mean of the sites' models since they all start from w_global; the mean is
  example-weighted when `weighted` is true (the default, as for every method here)
  and the paper's plain mean with `weighted = false`. The control variate follows the
  paper exactly, with a plain mean whatever `weighted` says (so that c stays the mean
  of the sites' c_i): `c += (|S| / N) * mean_{i in S}(dc_i)`, |S| = sites that
  replied, N = sites connected when the round was configured.

Sites send dc_i (`scaffold-dc`), never c_i; a reply with any other extra record, or a
dc_i over keys other than the shared parameters, is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from core.methods import SCAFFOLD_C_RECORD as CONTROL_RECORD
from core.methods import SCAFFOLD_DC_RECORD as CONTROL_UPDATE_RECORD
from strategies.base import BadReply, PrivacyViolation, SharedModelStrategy

STATE_PREFIX = "control/"


class Scaffold(SharedModelStrategy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
            content[CONTROL_RECORD] = ArrayRecord({k: Array(v) for k, v in self.control.items()})
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
        updates = [self.control_update(m) for m in replies]
        keys = set(updates[0])
        if any(set(u) != keys for u in updates):
            raise ValueError("sites sent control variate updates over different parameters")
        if self.control and set(self.control) != keys:
            raise ValueError("the sites' control variate updates do not match the server's control variate")
        scale = len(updates) / max(self.num_nodes, len(updates))
        for key in keys:
            mean_dc = np.mean([u[key].astype(np.float64) for u in updates], axis=0)
            current = self.control.get(key, np.zeros_like(mean_dc))
            self.control[key] = (current + scale * mean_dc).astype(updates[0][key].dtype)
        norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in self.control.values())))
        metrics["control_norm"] = norm
        return arrays, metrics

    def check_reply(self, msg: Message) -> None:
        """The base checks, and a dc_i over shared parameters with their shapes, all finite."""
        super().check_reply(msg)
        node = msg.metadata.src_node_id
        if CONTROL_UPDATE_RECORD not in msg.content.array_records:
            raise BadReply(f"site (node {node}) sent no SCAFFOLD control variate update ({CONTROL_UPDATE_RECORD!r})")
        record = msg.content[CONTROL_UPDATE_RECORD]
        outside = set(record.keys()) - self.shared_keys
        if outside:
            raise PrivacyViolation(
                f"site (node {node}) sent control variate updates outside the shared parameters, "
                f"e.g. {sorted(outside)[:3]}"
            )
        expected = set(self.control) or self.parameter_keys()
        if set(record.keys()) != expected:
            raise BadReply(
                f"site (node {node}) sent control variate updates over {len(record.keys())} parameters, "
                f"expected {len(expected)} (missing e.g. {sorted(expected - set(record.keys()))[:3]})"
            )
        self.check_arrays(node, CONTROL_UPDATE_RECORD, record, self.specs)

    def parameter_keys(self) -> set[str]:
        """The shared arrays that are trained parameters (BatchNorm's running statistics and
        counters are buffers): what dc_i covers."""
        return {
            k
            for k, spec in self.specs.items()
            if np.issubdtype(spec.dtype, np.floating) and not k.endswith(("running_mean", "running_var"))
        }

    @staticmethod
    def control_update(msg: Message) -> dict[str, np.ndarray]:
        record = msg.content[CONTROL_UPDATE_RECORD]
        return {k: np.array(record[k].numpy()) for k in record.keys()}
