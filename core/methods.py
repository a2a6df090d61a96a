"""The method contract: for each method, what is shared and which records it exchanges.

This is the one registry of methods. The server side (`strategies/`, `server_app/`) and
the site side (`client_app/`) both read it and never import each other: the server
learns here which model parts a method averages, the site which parts it may send.
A method's strategy and trainer are named as `module:Class` strings, loaded only when
a run asks for that method (so nothing here imports a layer above `core`).

Adding a method: one `MethodContract` entry below, `client_app/trainers/<method>.py`
and, when its server does more than example-weighted averaging, `strategies/<method>.py`
(see docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# -- model parts (the first dotted component of every state_dict key) ---------------
ENCODER, DECODER, CLASSIFIER = "encoder", "decoder", "classifier"
PARTS = (ENCODER, DECODER, CLASSIFIER)

# -- record names in messages ------------------------------------------------------
CONFIG_RECORD = "config"  # server -> site: the run configuration and the round
ARRAYS_RECORD = "arrays"  # both ways: the shared arrays
METRICS_RECORD = "metrics"  # site -> server: training metrics and bookkeeping
EVALUATION_RECORD = "evaluation"  # site -> server: metrics of the model it received (previous round)
TIMELINE_RECORD = "timeline"  # site -> server: wall-clock marks of the message (client_app/timeline.py)
GRADIENTS_RECORD = "gradients"  # site -> server: classifier gradients for Gamma (opt-in at a deployed site)
SCAFFOLD_C_RECORD = "scaffold-c"  # server -> site: SCAFFOLD's server control variate c
SCAFFOLD_DC_RECORD = "scaffold-dc"  # site -> server: dc_i = c_i+ - c_i (never c_i itself)

# -- keys of the config record beyond the run configuration --------------------------
ROUND_KEY = "server-round"  # Flower's FedAvg adds it to every message
EVALUATE_KEY = "evaluate-received"  # train message: evaluate the received model before training on it
SPLITS_KEY = "evaluate-splits"  # "all", or "local" when the server evaluates the official splits itself
MESSAGE_KEYS = (ROUND_KEY, EVALUATE_KEY, SPLITS_KEY)

# -- metric keys with a meaning beyond "average me" ---------------------------------
WEIGHT_KEY = "num-examples"
SITE_ID_KEY = "site-id"
RESTORED_KEY = "restored"
BOOKKEEPING = frozenset({WEIGHT_KEY, SITE_ID_KEY, RESTORED_KEY})

# -- what a site's metric records may hold (checked before the server reads a reply) -----
#: names the server writes into metrics.jsonl and timeline.jsonl itself: a site's metric of
#: that name would overwrite them (so would any name ending in `_worst`, the server's worst-site figures)
SERVER_FIELDS = frozenset(
    {
        "round", "round_seconds", "num_replies", "num_evaluated", "failed_sites", "failed_eval_sites",
        "global_acc_mean", "global_acc_worst", "global_acc_first5", "local_acc_mean", "macro_f1",
        "balanced_acc", "auc", "val_acc_mean", "gamma", "gamma_orig", "gamma_r", "gamma_phi",
        "control_norm", "dp_noise_std", "dp_epsilon", "resumed", "run_name", "method", "dataset",
        "phase", "node", "push_start", "push_done", "pulled",
    }
)  # fmt: skip
METRIC_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class BadRecord(ValueError):
    """A site's metric record that the server must not read."""


def check_site_metrics(name: str, record: Mapping[str, object]) -> None:
    """Every entry of a site's metric record is a number (NaN for "undefined", never
    infinite) under a plain name that is not one of the server's own fields; `site-id` is a
    non-negative integer."""
    if len(record) > 512:
        raise BadRecord(f"{name} record has {len(record)} entries")
    for key, value in record.items():
        if not isinstance(key, str) or not METRIC_NAME.fullmatch(key):
            raise BadRecord(f"{name} record has a metric named {str(key)[:80]!r}")
        if key.lower() in SERVER_FIELDS or key.endswith("_worst"):
            raise BadRecord(f"{name} record has a metric named {key!r}, which is the server's own field")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRecord(f"{name} record has {key!r} = {type(value).__name__}, expected a number")
        if isinstance(value, float) and math.isinf(value):  # NaN is allowed: "undefined here" (an AUC on one class)
            raise BadRecord(f"{name} record has an infinite {key!r}")
    site = record.get(SITE_ID_KEY)
    if site is not None and (not isinstance(site, int) or site < 0):
        raise BadRecord(f"{name} record has {SITE_ID_KEY} = {site!r}, expected a non-negative integer")


class PartedModel(Protocol):
    """What the contract needs of a model (models.SiteModel provides it)."""

    def keys_of(self, parts: tuple[str, ...], *, batchnorm: bool = True) -> list[str]: ...


@dataclass(frozen=True)
class MethodContract:
    """One method: what leaves a site, what arrives, and where its code lives."""

    name: str
    summary: str
    uses_encoder: bool  # the model has a private encoder E_i and the shared decoder D
    shared_parts: tuple[str, ...]  # model parts averaged by the server
    trainer: str  # "module:Class" of the site's trainer
    strategy: str = "strategies.base:SharedModelStrategy"  # "module:Class" of the server's strategy
    share_batchnorm: bool = True  # FedBN keeps BatchNorm layers private
    records_to_site: tuple[str, ...] = ()  # array records beyond the shared arrays
    records_to_server: tuple[str, ...] = ()  # array records beyond the shared arrays (and opt-in gradients)
    private_extras: tuple[str, ...] = ()  # names of non-model private state (saved at the site, never sent)

    @property
    def same_model_everywhere(self) -> bool:
        """True when every site evaluates the same model (nothing private changes the
        prediction): then the official test and validation splits need one evaluation
        per round, not one per site."""
        return not self.uses_encoder and self.share_batchnorm

    def shared_keys(self, model: PartedModel) -> list[str]:
        """State_dict keys sent to and received from the server; all others stay private."""
        return model.keys_of(self.shared_parts, batchnorm=self.share_batchnorm)

    def allowed_reply_records(self) -> frozenset[str]:
        return frozenset({ARRAYS_RECORD, GRADIENTS_RECORD, *self.records_to_server})

    def load_trainer(self) -> Any:
        return _load(self.trainer)()

    def load_strategy_class(self) -> type:
        return _load(self.strategy)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, MethodContract] = {
    contract.name: contract
    for contract in (
        MethodContract(
            name="fusedspacefed",
            summary="private encoder E_i; D and C averaged; C sees x + D(E_i(x))",
            uses_encoder=True,
            shared_parts=(DECODER, CLASSIFIER),
            trainer="client_app.trainers.fusedspacefed:FusedSpaceFedTrainer",
        ),
        MethodContract(
            name="fedavg",
            summary="the classifier averaged",
            uses_encoder=False,
            shared_parts=(CLASSIFIER,),
            trainer="client_app.trainers.fedavg:FedAvgTrainer",
        ),
        MethodContract(
            name="fedprox",
            summary="FedAvg with a proximal term at the site",
            uses_encoder=False,
            shared_parts=(CLASSIFIER,),
            trainer="client_app.trainers.fedprox:FedProxTrainer",
        ),
        MethodContract(
            name="scaffold",
            summary="control variates correct the local drift; c_i private, dc_i sent",
            uses_encoder=False,
            shared_parts=(CLASSIFIER,),
            trainer="client_app.trainers.scaffold:ScaffoldTrainer",
            strategy="strategies.scaffold:Scaffold",
            records_to_site=(SCAFFOLD_C_RECORD,),
            records_to_server=(SCAFFOLD_DC_RECORD,),
            private_extras=("c_i",),
        ),
        MethodContract(
            name="fedbn",
            summary="the classifier averaged except its BatchNorm layers, which stay at each site",
            uses_encoder=False,
            shared_parts=(CLASSIFIER,),
            trainer="client_app.trainers.fedavg:FedAvgTrainer",
            share_batchnorm=False,
        ),
    )
}


def contract_for(method: str) -> MethodContract:
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method]
