"""One site's round, in one message where the method allows (the heavy part of the
ClientApp: torch, data, models; `client_app.app` imports it only when a message needs it,
or hands the message to a warm site worker that has it loaded).

A train message carries the global model of the previous round. The site first
evaluates that model (with its own private parts) when the server asks, then trains
on it, saves its private state and replies with the shared arrays only (the method
contract says which), its training metrics and that evaluation. An evaluate message
(after the last round, or for a site not sampled to train) only evaluates.

What leaves a site: the shared arrays, metrics, a description of its data (split sizes,
the test split's majority-class share, its file's split settings), the records its method's contract
names (SCAFFOLD's dc_i) and, only when `measure-gamma` is on and the site allows it
(simulated sites always; a deployed site with `allow-gradients = true` in its own
node config), classifier gradients on one batch for Gamma. With `dp-clip-norm` > 0 the
shared arrays are the received global ones plus the site's update clipped to that norm
(client_app.privacy; docs/privacy.md).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log

from client_app.evaluation import evaluate_site, majority_share_of_test
from client_app.node import flag, node_settings, require_privacy
from client_app.privacy import clip_shared_update
from client_app.secagg import HANDLERS as SECAGG_HANDLERS
from client_app.secagg import advertise
from client_app.state import PrivateArrays, PrivateState
from client_app.timeline import Timeline
from client_app.trainers import LocalRound, Trainer
from client_app.training import classification_loss, classifier_gradient, fast_layout
from core.config import RunConfig
from core.data_report import site_data_record
from core.device import resolve_device, set_threads
from core.methods import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DATA_RECORD,
    EVALUATE_KEY,
    EVALUATION_RECORD,
    GRADIENTS_RECORD,
    METRICS_RECORD,
    RESTORED_KEY,
    ROUND_KEY,
    SITE_ID_KEY,
    SPLITS_KEY,
    TIMELINE_RECORD,
    WEIGHT_KEY,
    MethodContract,
    contract_for,
)
from core.secagg import KEYS_RECORD, flatten, max_weight, update_keys
from core.seeds import BATCH_ORDER, GAMMA_BATCH, SECAGG_ROUNDING, private_init_seed, round_seed
from core.settings import run_config, site_settings
from models import SiteModel, build_run_model
from partitions.site_data import SiteData

IMPORTED = time.time()


class Site:
    """This node's identity, data, private state and model for one message."""

    def __init__(
        self, content: RecordDict, context: Context, phase: str = "train", timeline: Timeline | None = None
    ) -> None:
        self.timeline = timeline or Timeline(IMPORTED)
        self.phase = phase  # "train" starts from the state of an earlier round, "evaluate" from this round's
        # this node's own settings and the run's: both parsed on the run's first message and kept
        # (client_app/node.py, core/settings.py)
        self.node = node = node_settings(context.run_id, context.node_config)
        self.cfg = run_config(*site_settings(content, context.state, node.state_dir or None))
        config = content[CONFIG_RECORD]  # what changes per message: the round, what to evaluate
        self.server_round = int(config.get(ROUND_KEY, 0))
        self.evaluate_received = flag(config.get(EVALUATE_KEY, False))
        self.evaluate_splits = str(config.get(SPLITS_KEY, "all"))
        self.contract: MethodContract = contract_for(self.cfg.method)
        require_privacy(self.cfg, node)  # before the site reads any of its data
        self.deployed = node.deployed
        self.allows_gradients = node.allows_gradients
        self.data: SiteData
        self.data, meta = node.source.load(self.cfg)
        self.meta = meta
        self.timeline.mark("data_loaded")
        self.site_id = node.partition_id if node.partition_id is not None else int(meta.get("site", 0))
        self.num_sites = node.num_partitions if node.num_partitions is not None else int(meta.get("num_sites", 1))
        self.name = node.site_name if node.site_name is not None else f"site-{self.site_id}"
        state_dir = node.state_dir or str(Path(self.cfg.results_dir) / self.cfg.run_name / "site-state")
        self.state = PrivateState(context.state, state_dir, self.cfg.run_name, self.name, self.cfg.keep_checkpoints)
        set_threads(self.cfg.num_threads)
        self.device = resolve_device(self.cfg.device)
        self.model = self._build_model(content[ARRAYS_RECORD])
        self.timeline.mark("model_built")

    def _build_model(self, global_arrays: ArrayRecord) -> SiteModel:
        seed = private_init_seed(self.cfg.seed, self.site_id, self.cfg.fused and self.cfg.shared_encoder_init)
        model = build_run_model(self.cfg, self.data.spec, seed=seed, contract=self.contract)
        self.shared_keys = self.contract.shared_keys(model, self.cfg.head_blocks)
        if self.phase == "train":  # which keys arrive and leave in this round (most methods: all shared both ways)
            self.received_keys, self.reply_keys = self.contract.key_sets(
                self.shared_keys, self.server_round, self.site_id, self.cfg.to_mapping()
            )
        else:  # an evaluate message carries the whole global model
            self.received_keys, self.reply_keys = self.shared_keys, []
        incoming = global_arrays.to_torch_state_dict()
        if set(incoming) != set(self.received_keys):
            raise ValueError(
                f"the server sent keys that differ from what this method sends in round {self.server_round} (missing "
                f"{sorted(set(self.received_keys) - set(incoming))[:5]}, unexpected "
                f"{sorted(set(incoming) - set(self.received_keys))[:5]})"
            )
        before = (self.server_round + (self.phase == "evaluate")) if self.server_round else None
        saved = self.state.load(before_round=before) or PrivateArrays()
        if self.state.source not in ("", "memory"):
            log(
                INFO,
                "site %s: private state of round %d restored from %s (sha256 %s)",
                self.name,
                self.state.loaded_round,
                self.state.source,
                saved.digest(),
            )
        self.extras = saved.extras
        self.restored = bool(saved)
        if self.cfg.rules.independent_start and self.server_round == 1 and self.phase == "train":
            # the reference protocol: every site starts from its own random initialisation
            # (seeded per site); round 1's aggregate averages them (method.md section 7)
            incoming = {}
        model.load_state_dict({**model.state_dict(), **saved.model, **incoming})
        return model.to(self.device)

    def private_arrays(self, extras: dict[str, torch.Tensor]) -> PrivateArrays:
        """Everything the server did not send this round (it may send the rest in a later one)."""
        received = set(self.received_keys)
        return PrivateArrays({k: v for k, v in self.model.state_dict().items() if k not in received}, extras)

    def shared_arrays(self) -> ArrayRecord:
        state = self.model.state_dict()
        return ArrayRecord({k: state[k].detach().cpu() for k in self.reply_keys})

    def generator(self, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed(round_seed(self.cfg.seed, self.server_round, self.site_id, purpose))

    def gradients(self) -> ArrayRecord:
        """Classifier gradients at the current global model on a deterministic batch
        (method.md section 3): on x, and for FusedSpaceFed also on x + D(E_i(x))."""
        x, y = self.data.train.first(self.cfg.gamma_batch_size, self.generator(GAMMA_BATCH))
        x, y = x.to(self.device), y.to(self.device)
        loss_fn = classification_loss(self.data.spec.multi_label)
        grads = {"orig": classifier_gradient(self.model, x, y, loss_fn, fused_input=False)}
        if self.model.fused:
            grads["fused"] = classifier_gradient(self.model, x, y, loss_fn, fused_input=True)
        return ArrayRecord(grads)

    def evaluate(self) -> MetricRecord:
        """The model this site holds (a method with a personal model: that one) on its
        splits, as client_app/evaluation.py says; the official test and validation splits
        only when the server does not evaluate them itself."""
        model = self.model
        if self.contract.personal_model:
            model = self.contract.load_trainer().personal(self.model, self.extras)
        metrics = evaluate_site(
            model,
            self.data,
            shared_splits=self.evaluate_splits == "all",
            recalibrate_bn=self.cfg.recalibrate_bn,
            device=self.device,
        )
        return MetricRecord({**metrics, WEIGHT_KEY: len(self.data.test), SITE_ID_KEY: self.site_id})

    def data_report(self) -> MetricRecord:
        """What this site's data is (sizes, its split's settings): core/data_report.py."""
        sizes = {
            "train": len(self.data.train),
            "val": len(self.data.val),
            "test": len(self.data.test),
            "local-test": len(self.data.local_test),
        }
        return MetricRecord(site_data_record(sizes, majority_share_of_test(self.data), self.meta))


def train_round(incoming: RecordDict, context: Context, timeline: Timeline | None = None) -> RecordDict:
    """One round at this site; returns the reply content (shared arrays and metrics)."""
    site = Site(incoming, context, timeline=timeline)
    content = RecordDict()
    if site.evaluate_received:
        content[EVALUATION_RECORD] = site.evaluate()
    site.timeline.mark("evaluated")
    if site.cfg.measure_gamma:
        if site.allows_gradients:
            content[GRADIENTS_RECORD] = site.gradients()
        else:
            log(
                WARNING,
                "site %s: measure-gamma is on but this site does not send gradients (set allow-gradients=true in "
                "its node config to opt in); Gamma is not measured this round",
                site.name,
            )
    trainer: Trainer = site.contract.load_trainer()
    job = LocalRound(
        cfg=site.cfg.replace(lr=site.cfg.round_lr(site.server_round)),  # `lr-schedule` applied here, once
        data=site.data,
        device=site.device,
        generator=site.generator(BATCH_ORDER),
        server_round=site.server_round,
        incoming=incoming,
        site_id=site.site_id,
        extras=site.extras,
    )
    with fast_layout(site.model, site.device):
        result = trainer.train(site.model, job)
    site.timeline.mark("trained")
    site.state.save(site.private_arrays(result.extras), site.server_round)
    site.timeline.mark("state_saved")
    content[ARRAYS_RECORD] = site.shared_arrays()
    if site.cfg.dp:
        content[ARRAYS_RECORD], norm = clip_shared_update(
            content[ARRAYS_RECORD], incoming[ARRAYS_RECORD], site.cfg.dp_clip_norm
        )
        # the norm before clipping stays here: sent in clear it would leak what the noise hides
        log(INFO, "site %s: shared update norm %.4g before clipping to %g", site.name, norm, site.cfg.dp_clip_norm)
    weight = {WEIGHT_KEY: len(site.data.train)}
    if site.cfg.secure_aggregation:
        # the update stays here, masked later; only the public keys leave now (client_app/secagg.py)
        trained = content.array_records.pop(ARRAYS_RECORD)
        content[KEYS_RECORD] = advertise(
            context.state,
            shared_update(trained, incoming[ARRAYS_RECORD]),
            len(site.data.train) if site.cfg.weighted_mean else 1,
            site.server_round,
            {
                **secagg_settings(site.cfg),
                "rounding-seed": round_seed(site.cfg.seed, site.server_round, site.site_id, SECAGG_ROUNDING),
            },
        )
        weight = {}  # the server learns the sum of the weights, never one site's
    content[METRICS_RECORD] = MetricRecord(
        {
            **result.metrics,
            **weight,
            SITE_ID_KEY: site.site_id,
            RESTORED_KEY: int(site.restored),
        }
    )
    for key, record in (result.outgoing or {}).items():
        content[key] = record
    site.timeline.mark("reply_ready")
    content[DATA_RECORD] = site.data_report()
    if site.cfg.secure_aggregation:
        del content[DATA_RECORD]["num-train"]  # = the example weight
    content[TIMELINE_RECORD] = MetricRecord(site.timeline.record())
    return content


def evaluate_round(incoming: RecordDict, context: Context, timeline: Timeline | None = None) -> RecordDict:
    """Evaluate the global model (with this site's private parts) on the site's data."""
    site = Site(incoming, context, phase="evaluate", timeline=timeline)
    evaluation = site.evaluate()
    site.timeline.mark("evaluated")
    site.timeline.mark("reply_ready")
    return RecordDict({EVALUATION_RECORD: evaluation, TIMELINE_RECORD: MetricRecord(site.timeline.record())})


def shared_update(trained: ArrayRecord, received: ArrayRecord) -> np.ndarray:
    """The floating-point shared arrays minus the received ones, as one float64 vector (keys
    sorted; integer arrays, BatchNorm's batch counters, stay as the server sent them)."""
    keys = update_keys({k: trained[k].numpy().dtype for k in trained.keys()})
    if set(trained.keys()) != set(received.keys()):
        raise ValueError("the trained and received shared arrays have different keys")
    return flatten({k: trained[k].numpy().astype(np.float64) - received[k].numpy() for k in keys}, keys)


def secagg_settings(cfg: RunConfig) -> dict[str, float | int]:
    return {
        "threshold": cfg.secagg_threshold,
        "clip": cfg.secagg_clip,
        "levels": cfg.secagg_quantization,
        "max-weight": max_weight(cfg.max_examples, cfg.weighted_mean),
    }


HANDLERS = {"train": train_round, "evaluate": evaluate_round, **SECAGG_HANDLERS}
