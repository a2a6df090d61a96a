"""The server side every method shares, built on Flower's FedAvg.

The strategy knows, from the method contract and the initial global arrays, exactly
what a reply may carry: the shared keys with the global arrays' shapes and dtypes,
finite values, a positive integer example count, and only the records the contract
names. `check_reply` is the one place that decides; `screen` turns its verdicts into
the round's failed sites, so a bad reply never touches the global model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from core.methods import (
    ARRAYS_RECORD,
    BOOKKEEPING,
    EVALUATION_RECORD,
    GRADIENTS_RECORD,
    METRICS_RECORD,
    SITE_ID_KEY,
    WEIGHT_KEY,
    Exchange,
    MethodContract,
    RecordMismatch,
)
from core.metrics import HEALTH_WORST_OF
from core.secagg import KEYS_RECORD
from core.transport import PackingError, check_arrays
from strategies.aggregation import average_arrays, mean_metrics, worst_metrics
from strategies.gamma import gamma, gamma_decomposition
from strategies.privacy import EPSILON_KEY, NOISE_STD_KEY, STATE_PREFIX, NoiseSource, PrivacyLedger, noise_std
from strategies.robust import bound_update, robust_arrays, update_norm


class BadReply(ValueError):
    """A reply that must not be aggregated: wrong keys, shapes or dtypes, non-finite values."""


class PrivacyViolation(BadReply):
    """A site sent something that must never leave it."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype


def array_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    return {k: ArraySpec(tuple(arrays[k].shape), np.dtype(arrays[k].numpy().dtype)) for k in arrays.keys()}


class SharedModelStrategy(FedAvg):
    """FedAvg over the contract's shared arrays, with reply checks, Gamma and evaluation metrics."""

    def __init__(
        self,
        contract: MethodContract,
        initial_arrays: ArrayRecord,
        *,
        weighted: bool = True,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        dp_clip_norm: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
        expects_gradients: bool = False,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        krum_byzantine: int = 1,
        max_update_norm: float = 0.0,
        max_examples: int = 0,
        secure: bool = False,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=1,  # fraction-evaluate alone sets how many evaluate (1.0: every site)
            min_available_nodes=min_available_nodes,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS_RECORD,
        )
        self.contract = contract
        # the run's resolved settings (kebab-case): a method's strategy reads its own here; the
        # messages carry only their digest (core/settings.py)
        self.settings: dict[str, object] = dict(settings or {})
        self.specs = array_specs(initial_arrays)
        self.shared_keys = frozenset(self.specs)
        # differential privacy (strategies/privacy.py): the noise is calibrated to the plain mean
        self.dp_clip_norm = dp_clip_norm
        self.dp_noise_multiplier = dp_noise_multiplier
        noised = dp_clip_norm > 0 and dp_noise_multiplier > 0
        self.noise = NoiseSource() if noised else None
        self.ledger = PrivacyLedger(dp_noise_multiplier, dp_delta) if noised else None
        self.weighted = weighted and dp_clip_norm <= 0
        self.expects_gradients = expects_gradients  # measure-gamma: only then may replies carry gradients
        # one site must not steer the model (strategies/robust.py)
        self.aggregation, self.trim_fraction, self.krum_byzantine = aggregation, trim_fraction, krum_byzantine
        self.max_update_norm, self.max_examples = max_update_norm, max_examples
        # secure aggregation (server_app/secure.py): replies carry public keys, not arrays
        self.secure = secure
        self.first_counts: dict[int, int] = {}  # node -> the example count of its first reply
        self.sent: dict[str, np.ndarray] | None = None  # the global arrays of this round's train messages

    # -- strategy state (server checkpoints) -------------------------------------
    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Server-side state beyond the global arrays that a resumed run needs: the DP noise
        generator and accountant here (they never leave the server), SCAFFOLD's control
        variate in its subclass."""
        state: dict[str, np.ndarray] = {}
        if self.noise is not None:
            state[STATE_PREFIX + "noise"] = self.noise.state()
            ledger = self.ledger.state()
            if ledger is not None:
                state[STATE_PREFIX + "accountant"] = ledger
        return state

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of `checkpoint_state`."""
        unknown = sorted(k for k in state if not k.startswith(STATE_PREFIX) or self.noise is None)
        if unknown:
            raise ValueError(f"{type(self).__name__} keeps no such state, but was given {unknown[:3]}")
        if STATE_PREFIX + "noise" in state:
            self.noise.restore(state[STATE_PREFIX + "noise"])
        if STATE_PREFIX + "accountant" in state:
            self.ledger.restore(state[STATE_PREFIX + "accountant"])

    # -- reply checks -------------------------------------------------------------
    def check_reply(self, msg: Message) -> None:
        """Raise BadReply (PrivacyViolation for private content) unless the reply is fit to aggregate."""
        node = msg.metadata.src_node_id
        try:  # every array readable as what it declares, before anything reads one
            check_arrays(msg.content)
        except PackingError as exc:
            raise BadReply(f"site (node {node}) sent an unreadable array: {exc}") from None
        records = msg.content.array_records
        allowed = self.contract.allowed_reply_records() | ({KEYS_RECORD} if self.secure else set())
        extra = set(records) - allowed
        if extra:
            raise PrivacyViolation(f"site (node {node}) sent unexpected array records {sorted(extra)}")
        if self.secure:
            self.check_secure_reply(node, msg)
            return
        if ARRAYS_RECORD not in records:
            raise BadReply(f"site (node {node}) sent no shared arrays")
        keys = set(records[ARRAYS_RECORD].keys())
        outside = keys - self.shared_keys
        if outside:
            raise PrivacyViolation(
                f"site (node {node}) sent {len(outside)} arrays outside the shared set, e.g. {sorted(outside)[:3]}; "
                "private state (encoder, control variates) must never leave a site"
            )
        expected = self.expected_reply_keys(msg)
        if keys != expected:
            raise BadReply(
                f"site (node {node}) sent arrays other than this round's: missing {sorted(expected - keys)[:3]}, "
                f"unexpected {sorted(keys - expected)[:3]}"
            )
        self.check_arrays(node, ARRAYS_RECORD, records[ARRAYS_RECORD], self.specs)
        if self.dp_clip_norm > 0 and self.sent is not None:  # DP holds only if every update is within the clip
            norm = update_norm(records[ARRAYS_RECORD], self.sent)
            if norm > self.dp_clip_norm * (1 + 1e-6) + 1e-9:
                raise BadReply(
                    f"site (node {node}) sent an update of norm {norm:.6g} > dp-clip-norm {self.dp_clip_norm:g}"
                )
        for exchange in self.contract.to_server:
            self.check_exchange(node, msg, exchange)
        if GRADIENTS_RECORD in records:
            self.check_gradients(node, records[GRADIENTS_RECORD])
        metrics = msg.content.metric_records.get(METRICS_RECORD)
        count = None if metrics is None else metrics.get(WEIGHT_KEY)
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise BadReply(f"site (node {node}) claims {count!r} training examples; expected a positive integer")

    def check_secure_reply(self, node: int, msg: Message) -> None:
        """Under secure aggregation a train reply holds the site's two public keys and no
        shared arrays and no example count (the server learns only their sums)."""
        records = msg.content.array_records
        if ARRAYS_RECORD in records:
            raise BadReply(f"site (node {node}) sent its shared arrays in the clear under secure aggregation")
        keys = records.get(KEYS_RECORD)
        if keys is None or set(keys.keys()) != {"pk1", "pk2"}:
            raise BadReply(f"site (node {node}) sent no public keys (pk1, pk2) for secure aggregation")
        for name in ("pk1", "pk2"):
            values = keys[name].numpy()
            if values.dtype != np.uint8 or values.ndim != 1 or not 0 < values.size <= 4096:
                raise BadReply(f"site (node {node}) sent a public key {name} that is not a byte string")
        metrics = msg.content.metric_records.get(METRICS_RECORD)
        if metrics is None or WEIGHT_KEY in metrics:
            raise BadReply(f"site (node {node}) sent its example count in the clear under secure aggregation")

    def expected_reply_keys(self, msg: Message) -> frozenset[str]:
        """The arrays a reply carries: every shared key (a method whose keys change per round
        says otherwise)."""
        return self.shared_keys

    def check_exchange(self, node: int, msg: Message, exchange: Exchange) -> None:
        """A record the contract says every reply carries: over exactly `exchange_keys`
        (never beyond the shared arrays), with their shapes and dtypes, finite."""
        record = msg.content.array_records.get(exchange.name)
        outside = set(record.keys()) - self.shared_keys if record is not None else set()
        if outside:
            raise PrivacyViolation(
                f"site (node {node}) sent {exchange.meaning} outside the shared parameters, e.g. {sorted(outside)[:3]}"
            )
        try:
            record = exchange.read(msg.content, self.exchange_keys())
        except RecordMismatch as exc:
            raise BadReply(f"site (node {node}): {exc}") from None
        self.check_arrays(node, exchange.name, record, self.specs)

    def exchange_keys(self) -> set[str]:
        """The keys the contract's exchanged records cover: the shared trained parameters."""
        return self.parameter_keys()

    def parameter_keys(self) -> set[str]:
        """The shared arrays that are trained parameters (BatchNorm's running statistics and
        counters are buffers)."""
        return {
            k
            for k, spec in self.specs.items()
            if np.issubdtype(spec.dtype, np.floating) and not k.endswith(("running_mean", "running_var"))
        }

    def check_gradients(self, node: int, record: ArrayRecord) -> None:
        """Gradients only when the run measures Gamma: `orig` (and, for FusedSpaceFed,
        `fused` of the same shape), finite."""
        if not self.expects_gradients:
            raise BadReply(f"site (node {node}) sent gradients, which this run (measure-gamma off) did not ask for")
        keys = set(record.keys())
        if "orig" not in keys or not keys <= {"orig", "fused"}:
            raise BadReply(f"site (node {node}) sent gradients {sorted(keys)[:3]}, expected 'orig' (and 'fused')")
        if "fused" in keys and record["fused"].shape != record["orig"].shape:
            raise BadReply(f"site (node {node}) sent fused and original gradients of different shapes")
        self.check_arrays(node, GRADIENTS_RECORD, record, None)

    @staticmethod
    def check_arrays(node: int, name: str, record: ArrayRecord, specs: Mapping[str, ArraySpec] | None) -> None:
        """Shapes and dtypes as in `specs` (when given) and every value finite."""
        for key in record.keys():
            values = record[key].numpy()
            if specs is not None:
                spec = specs[key]
                if tuple(values.shape) != spec.shape or values.dtype != spec.dtype:
                    raise BadReply(
                        f"site (node {node}) sent {name} {key!r} as {values.dtype}{list(values.shape)}, "
                        f"expected {spec.dtype}{list(spec.shape)}"
                    )
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                raise BadReply(f"site (node {node}) sent non-finite values (NaN or Inf) in {name} {key!r}")

    def screen(self, replies: Iterable[Message]) -> tuple[list[Message], list[tuple[Message, str]]]:
        """(replies fit to aggregate, in a fixed order; (reply, reason) for the others)."""
        good, bad = [], []
        for msg in replies:
            try:
                self.check_reply(msg)
            except BadReply as exc:
                bad.append((msg, str(exc)))
            except Exception as exc:  # nothing a site sends may stop the round: a failed site, with the reason
                bad.append((msg, f"reply could not be checked ({type(exc).__name__}: {str(exc)[:200]})"))
            else:
                good.append(msg)
        # A fixed order makes float sums, and so whole runs, repeatable whatever the arrival order.
        return sorted(good, key=_reply_order), bad

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's, remembering the global arrays sent: updates are measured against them."""
        self.sent = {k: np.array(arrays[k].numpy()) for k in arrays.keys()}
        return super().configure_train(server_round, arrays, config, grid)

    def weights(self, replies: list[Message]) -> list[float]:
        """Example counts, each bounded by the site's first claim of the run and by
        `max-examples` (a claim of 10^12 would otherwise take all the weight)."""
        if not self.weighted:
            return [1.0] * len(replies)
        out = []
        for msg in replies:
            count = int(msg.content[METRICS_RECORD][WEIGHT_KEY])
            count = min(count, self.first_counts.setdefault(msg.metadata.src_node_id, count))
            out.append(float(min(count, self.max_examples) if self.max_examples > 0 else count))
        return out

    # -- training ---------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies that passed `screen` (checked again: a bad one raises)."""
        valid = sorted(replies, key=_reply_order)
        if not valid:
            return None, None
        for msg in valid:
            self.check_reply(msg)
        weights = self.weights(valid)
        arrays = self.aggregate_arrays(server_round, valid, weights)
        upload = float(np.mean([_array_bytes(m) for m in valid]))
        arrays, metrics = self.noised_round(arrays, valid, weights, upload)
        metrics.update(self.gradient_dissimilarity(valid))
        return arrays, MetricRecord(metrics)

    def noised_round(
        self, arrays: ArrayRecord, replies: list[Message], weights: list[float], upload_bytes: float
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The round's training metrics (weighted means, the worst site's health, replies,
        upload), and under DP the noise on `arrays` with its epsilon: the same for the plain
        and the secure sum."""
        records = [m.content[METRICS_RECORD] for m in replies]
        metrics = mean_metrics(records, weights, skip=BOOKKEEPING)
        metrics.update(worst_metrics(records, HEALTH_WORST_OF))
        metrics["num_replies"] = len(replies)
        metrics["upload_bytes"] = upload_bytes
        if self.dp_clip_norm > 0:
            std = noise_std(self.dp_noise_multiplier, self.dp_clip_norm, len(replies))
            if self.noise is not None:
                arrays = self.noise.add_noise(arrays, std)
                metrics[EPSILON_KEY] = self.ledger.spend_round(len(replies))
            metrics[NOISE_STD_KEY] = std
        return arrays, metrics

    def aggregate_secure(
        self, server_round: int, replies: list[Message], mean_update: Mapping[str, np.ndarray], upload_bytes: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The round's global arrays from the weighted mean update that secure aggregation
        unmasked (server_app/secure.py) over `replies`' sites: the arrays sent plus that
        update (integer arrays as sent); DP noise on it as in `aggregate_train`."""
        if self.sent is None:
            raise ValueError("secure aggregation before any train message was configured")
        arrays = {}
        for key, values in self.sent.items():
            if key in mean_update:
                values = (values.astype(np.float64) + mean_update[key]).astype(values.dtype)
            arrays[key] = Array(np.require(values, requirements="C"))  # keeps a 0-d array 0-d
        ordered = sorted(replies, key=_reply_order)
        # no site's weight is known: its training metrics are averaged unweighted
        result, metrics = self.noised_round(ArrayRecord(arrays), ordered, [1.0] * len(ordered), float(upload_bytes))
        return result, MetricRecord(metrics)

    def aggregate_arrays(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        records = [m.content[ARRAYS_RECORD] for m in replies]
        if self.max_update_norm > 0 and self.sent is not None:
            records = [bound_update(r, self.sent, self.max_update_norm) for r in records]
        if self.aggregation == "mean":
            return average_arrays(records, weights)
        return robust_arrays(records, self.aggregation, self.trim_fraction, self.krum_byzantine)

    @staticmethod
    def gradient_dissimilarity(replies: list[Message]) -> dict[str, float]:
        """Gamma from the sites' gradients, when every site sent them (opt-in at deployed sites)."""
        grads = [m.content[GRADIENTS_RECORD] for m in replies if GRADIENTS_RECORD in m.content.array_records]
        if len(grads) != len(replies) or not grads:
            return {}
        original = [_tensor(g["orig"]) for g in grads]
        if len({t.shape for t in original}) != 1:
            return {}
        if all("fused" in g for g in grads):
            return gamma_decomposition(original, [_tensor(g["fused"]) for g in grads])
        return {"gamma": gamma(original)}

    # -- evaluation -------------------------------------------------------------
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], central: Mapping[str, float] | None = None
    ) -> MetricRecord | None:
        """The round's evaluation metrics from the sites' `evaluation` records; `central`:
        the server's own `test_*`/`val_*` of a model that is the same at every site."""
        # in site order, as in aggregate_train: float sums depend on the order of replies,
        # which is the order they happened to arrive in
        ordered = sorted(replies, key=_reply_order)
        records = [m.content[EVALUATION_RECORD] for m in ordered if EVALUATION_RECORD in m.content.metric_records]
        if not records and not central:
            return None
        metrics = mean_metrics(records, [1.0] * len(records), skip=BOOKKEEPING) if records else {}
        tested = [r for r in records if "test_acc" in r and not np.isnan(float(r["test_acc"]))]
        site_test = [float(r["test_acc"]) for r in tested]
        first5 = [float(r["test_acc"]) for r in tested if int(r.get(SITE_ID_KEY, 0)) < 5]
        if not site_test and central:
            metrics.update(central)
            site_test = first5 = [float(central["test_acc"])]
        summary = {
            "global_acc_mean": float(np.mean(site_test)) if site_test else float("nan"),
            "global_acc_worst": float(np.min(site_test)) if site_test else float("nan"),
            # the reference code's "global accuracy": the mean over the first 5 sites
            "global_acc_first5": float(np.mean(first5)) if first5 else float("nan"),
            "local_acc_mean": metrics.pop("local_acc", float("nan")),
            "macro_f1": metrics.pop("test_macro_f1", float("nan")),
            "balanced_acc": metrics.pop("test_balanced_acc", float("nan")),
            "auc": metrics.pop("test_auc", float("nan")),
            "val_acc_mean": metrics.pop("val_acc", float("nan")),
            "num_evaluated": len(records),
        }
        metrics.pop("test_acc", None)  # one name per metric: it is global_acc_mean
        return MetricRecord({**summary, **metrics})


def _reply_order(msg: Message) -> tuple[int, int]:
    metrics = msg.content.metric_records.get(METRICS_RECORD) or msg.content.metric_records.get(EVALUATION_RECORD, {})
    return int(metrics.get(SITE_ID_KEY, 0)), int(msg.metadata.src_node_id)


def _array_bytes(msg: Message) -> int:
    """Bytes of every array a reply carries (what the site uploaded, before packing)."""
    return sum(int(record[k].numpy().nbytes) for record in msg.content.array_records.values() for k in record.keys())


def _tensor(array: Array) -> torch.Tensor:
    return torch.from_numpy(np.array(array.numpy()))
