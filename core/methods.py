"""The method contract: for each method, what is shared and which records it exchanges.

This is the one registry of methods. The server side (`strategies/`, `server_app/`) and
the site side (`client_app/`) both read it and never import each other: the server
learns here which model parts a method averages, the site which parts it may send.
A method's strategy and trainer are named as `module:Class` strings, loaded only when
a run asks for that method (so nothing here imports a layer above `core`).

Adding a method: one `MethodContract` entry below, at most one trainer
(`client_app/trainers/<method>.py`; a method that trains like FedAvg and only shares
differently needs none) and, when its server does more than example-weighted averaging,
one strategy (`strategies/<method>.py`); see docs/adding-a-method.md. A method's name
appears nowhere else in the code (tests/test_contract.py).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

# -- model parts (the first dotted component of every state_dict key; a method shares
#    keys by prefix, see KeySet) ---------------------------------------------------------
ENCODER, DECODER, CLASSIFIER = "encoder", "decoder", "classifier"
AUX = "aux"  # networks a method adds beside the classifier (`aux.<name>.*`, see MethodContract.aux_modules)
PARTS = (ENCODER, DECODER, CLASSIFIER, AUX)

# -- record names in messages ------------------------------------------------------
CONFIG_RECORD = "config"  # server -> site: the round, what to evaluate, the settings' digest (core/settings.py)
ARRAYS_RECORD = "arrays"  # both ways: the shared arrays
METRICS_RECORD = "metrics"  # site -> server: training metrics and bookkeeping
EVALUATION_RECORD = "evaluation"  # site -> server: metrics of the model it received (previous round)
TIMELINE_RECORD = "timeline"  # site -> server: wall-clock marks of the message (client_app/timeline.py)
GRADIENTS_RECORD = "gradients"  # site -> server: classifier gradients for Gamma (opt-in at a deployed site)
DATA_RECORD = "site-data"  # site -> server: what the site's data is (sizes, its split's settings; core/data_report.py)

# -- keys of the config record (with core/settings.py's digest of the run's settings) ----
ROUND_KEY = "server-round"  # Flower's FedAvg adds it to every message
EVALUATE_KEY = "evaluate-received"  # train message: evaluate the received model before training on it
SPLITS_KEY = "evaluate-splits"  # "all", or "local" when the server evaluates the official splits itself

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
        "phase", "node", "push_start", "push_done", "pulled", "upload_bytes",
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


#: the normalisation `norm = "auto"` gives a method unless its contract says otherwise
RECIPE_NORM = "batch-recal"

# -- which state_dict keys a method shares ------------------------------------------

#: stands for the classifier's head in a `KeySet`: its linear layer and, with `head-blocks`
#: = k > 0, also the final norm and the last k residual blocks (where the split lies)
HEAD = "@head"
_STAGE = re.compile(r"classifier\.stages\.(\d+)\.")


def head_prefixes(keys: Iterable[str], head_blocks: int) -> tuple[str, ...]:
    """The key prefixes of the classifier's head for a model with `keys`."""
    prefixes = [f"{CLASSIFIER}.head"]
    if head_blocks > 0:
        blocks = sorted({int(m.group(1)) for k in keys if (m := _STAGE.match(k))})
        if head_blocks > len(blocks):
            raise ValueError(f"head-blocks = {head_blocks}, but the classifier has {len(blocks)} blocks")
        prefixes += [f"{CLASSIFIER}.bn"] + [f"{CLASSIFIER}.stages.{i}" for i in blocks[len(blocks) - head_blocks :]]
    return tuple(prefixes)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


@dataclass(frozen=True)
class KeySet:
    """State_dict keys by dotted prefix: those under any of `include` and under none of
    `exclude` (so a classifier's body and head can be shared differently). `HEAD` in
    either stands for the head's prefixes (`head_prefixes`)."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def select(self, keys: Iterable[str], head_blocks: int = 0) -> list[str]:
        keys = list(keys)

        def expand(prefixes: tuple[str, ...]) -> tuple[str, ...]:
            out: list[str] = []
            for prefix in prefixes:
                out += head_prefixes(keys, head_blocks) if prefix == HEAD else [prefix]
            return tuple(out)

        include, exclude = expand(self.include), expand(self.exclude)
        return [k for k in keys if any(_under(k, p) for p in include) and not any(_under(k, p) for p in exclude)]


# -- records a method exchanges beyond the shared arrays ---------------------------------


class RecordMismatch(ValueError):
    """An exchanged record that does not hold what the method's contract says."""


@dataclass(frozen=True)
class Exchange:
    """An array record a method adds to its messages, over the shared arrays' trained
    parameters (SCAFFOLD's c to the sites, dc_i back). Both ends build and check it here,
    so its name and contents are written once."""

    name: str
    meaning: str
    may_be_empty: bool = False  # e.g. c before the server has aggregated anything (read as zeros)

    def build(self, arrays: Mapping[str, Any]) -> ArrayRecord:
        """The record from a mapping of key -> array (numpy or torch)."""
        if not arrays and not self.may_be_empty:
            raise RecordMismatch(f"record {self.name!r} ({self.meaning}) cannot be empty")
        if arrays and isinstance(next(iter(arrays.values())), np.ndarray):
            return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})
        return ArrayRecord(dict(arrays))

    def read(self, content: RecordDict, expected: Iterable[str]) -> ArrayRecord:
        """The record from a message's content, checked to cover exactly `expected` keys
        (or to be empty where that is allowed)."""
        if self.name not in content.array_records:
            raise RecordMismatch(f"no {self.meaning} (record {self.name!r}) in the message")
        record = content.array_records[self.name]
        keys, wanted = set(record.keys()), set(expected)
        if not keys and self.may_be_empty:
            return record
        if keys != wanted:
            raise RecordMismatch(
                f"record {self.name!r} ({self.meaning}) covers {len(keys)} arrays, expected {len(wanted)} (missing "
                f"e.g. {sorted(wanted - keys)[:3]}, unexpected e.g. {sorted(keys - wanted)[:3]})"
            )
        return record


class PartedModel(Protocol):
    """What the contract needs of a model (models.SiteModel provides it)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def batchnorm_keys(self) -> set[str]: ...

    def batchnorm_statistics_keys(self) -> set[str]: ...


@dataclass(frozen=True)
class MethodContract:
    """One method: what leaves a site, what arrives, what the site evaluates, and where its
    code lives."""

    name: str
    label: str  # how tables and plots name it
    summary: str  # one line: what the method does
    private: str  # what a site keeps to itself, in words (for onboarding, prediction and docs)
    uses_encoder: bool  # the model has a private encoder E_i and the shared decoder D
    shared: KeySet  # state_dict keys the server averages; everything else stays at the site
    trainer: str  # "module:Class" of the site's trainer
    strategy: str = "strategies.base:SharedModelStrategy"  # "module:Class" of the server's strategy
    share_batchnorm: bool = True  # False keeps BatchNorm layers private (FedBN)
    share_bn_statistics: bool = True  # False keeps BatchNorm running statistics private, weights shared (FRAug)
    aux_modules: str = ""  # "module:function" (feature_dim, num_classes) -> {name: nn.Module} beside the classifier
    classifier_builder: str = ""  # "module:function" (in_channels, num_classes, norm, cfg) -> the classifier (FuseFL)
    round_keys: str = ""  # "module:function": which shared keys travel in which round (FuseFL), see key_sets
    config_check: str = ""  # "module:function" (run config mapping) -> why the method cannot run it, or None
    # "module:function" (run config mapping, number of sites or None) -> the settings that follow from the
    # run and its federation, where the config leaves them at 0 = automatic (FuseFL's stages and columns)
    derived_settings: str = ""
    to_site: tuple[Exchange, ...] = ()  # array records the server adds to train messages
    to_server: tuple[Exchange, ...] = ()  # array records every reply carries besides the shared arrays
    personal_model: bool = False  # the site evaluates a personal model it keeps beside the global one (Ditto)
    # what `norm = "auto"` (the default) means for this method: BatchNorm statistics recomputed at
    # each site before it evaluates, or (FuseFL) the model's own, those its head was calibrated on
    default_norm: str = RECIPE_NORM
    # why the server needs each site's update, not only their sum ("" = the sum suffices): then
    # `secure-aggregation = true` is refused with this reason
    needs_each_update: str = ""

    def shared_keys(self, model: PartedModel, head_blocks: int = 0) -> list[str]:
        """State_dict keys sent to and received from the server; all others stay private."""
        keys = self.shared.select(model.state_dict().keys(), head_blocks)
        if not self.share_batchnorm:
            batchnorm = model.batchnorm_keys()
            keys = [k for k in keys if k not in batchnorm]
        if not self.share_bn_statistics:
            statistics = model.batchnorm_statistics_keys()
            keys = [k for k in keys if k not in statistics]
        return keys

    def key_sets(
        self, shared: list[str], server_round: int, site: int | None, config: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """(keys the server sends in `server_round`, keys site `site` sends back): all shared
        keys both ways, unless the method's keys change per round."""
        if not self.round_keys:
            return shared, shared
        return _load(self.round_keys)(shared, server_round, site, config)

    def settings_from_federation(self, config: Mapping[str, Any], num_sites: int | None) -> dict[str, Any]:
        """Settings (kebab-case) that follow from the rest of the configuration and, once the
        sites are known, from their number; {} for a method that derives none."""
        return _load(self.derived_settings)(config, num_sites) if self.derived_settings else {}

    def config_problem(self, config: Mapping[str, Any]) -> str | None:
        """Why this method cannot run a configuration (kebab-case mapping), or None."""
        return _load(self.config_check)(config) if self.config_check else None

    def same_model_everywhere(self, model: PartedModel, head_blocks: int = 0) -> bool:
        """True when every site evaluates the same model: every key is shared and no
        personal model is kept. Then the official test and validation splits need one
        evaluation per round, not one per site."""
        return not self.personal_model and len(self.shared_keys(model, head_blocks)) == len(model.state_dict())

    def allowed_reply_records(self) -> frozenset[str]:
        return frozenset({ARRAYS_RECORD, GRADIENTS_RECORD, *(e.name for e in self.to_server)})

    def build_aux_modules(self, feature_dim: int, num_classes: int) -> dict[str, Any]:
        """The method's networks beside the classifier (none for most methods)."""
        return _load(self.aux_modules)(feature_dim, num_classes) if self.aux_modules else {}

    def build_classifier(self, in_channels: int, num_classes: int, norm: str, cfg: Any) -> Any:
        """The method's own classifier (only for a contract with `classifier_builder`)."""
        return _load(self.classifier_builder)(in_channels, num_classes, norm, cfg)

    def load_trainer(self) -> Any:
        return _load(self.trainer)()

    def load_strategy_class(self) -> type:
        return _load(self.strategy)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


CLASSIFIER_ONLY = KeySet((CLASSIFIER,))
BASELINE = "fedavg"  # the method every comparison is made against
DEFAULT_METHOD = "fusedspacefed"
FEDAVG_TRAINER = "client_app.trainers.fedavg:FedAvgTrainer"

METHODS: dict[str, MethodContract] = {
    contract.name: contract
    for contract in (
        MethodContract(
            name="fusedspacefed",
            label="FusedSpaceFed",
            summary="private encoder E_i; D and C averaged; C sees x + D(E_i(x))",
            private="its own encoder E_i",
            uses_encoder=True,
            shared=KeySet((DECODER, CLASSIFIER)),
            trainer="client_app.trainers.fusedspacefed:FusedSpaceFedTrainer",
        ),
        MethodContract(
            name="fedavg",
            label="FedAvg",
            summary="the classifier averaged",
            private="nothing",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer=FEDAVG_TRAINER,
        ),
        MethodContract(
            name="fedprox",
            label="FedProx",
            summary="FedAvg with a proximal term at the site",
            private="nothing",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer="client_app.trainers.fedprox:FedProxTrainer",
        ),
        MethodContract(
            name="scaffold",
            label="SCAFFOLD",
            summary="control variates correct the local drift; c_i private, dc_i sent",
            private="its control variate c_i",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer="client_app.trainers.scaffold:ScaffoldTrainer",
            strategy="strategies.scaffold:Scaffold",
            to_site=(Exchange("scaffold-c", "SCAFFOLD's server control variate c", may_be_empty=True),),
            to_server=(Exchange("scaffold-dc", "SCAFFOLD's control variate update dc_i = c_i+ - c_i"),),
            needs_each_update="the server reads each site's control-variate update dc_i in the clear (they are "
            "not summed securely)",
        ),
        MethodContract(
            name="fedbn",
            label="FedBN",
            summary="the classifier averaged except its BatchNorm layers, which stay at each site",
            private="its own BatchNorm layers",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer=FEDAVG_TRAINER,
            share_batchnorm=False,
        ),
        MethodContract(
            name="lg-fedavg",
            label="LG-FedAvg",
            summary="private lower layers (the body), the head averaged (Liang et al. 2020)",
            private="its own body (all but the classifier's head)",
            uses_encoder=False,
            shared=KeySet((HEAD,)),
            trainer=FEDAVG_TRAINER,
        ),
        MethodContract(
            name="fedper",
            label="FedPer",
            summary="the body averaged, a private head; body and head trained together (Arivazhagan et al. 2019)",
            private="its own head",
            uses_encoder=False,
            shared=KeySet((CLASSIFIER,), exclude=(HEAD,)),
            trainer=FEDAVG_TRAINER,
        ),
        MethodContract(
            name="fedrep",
            label="FedRep",
            summary="the body averaged, a private head trained first with the body frozen (Collins et al. 2021)",
            private="its own head",
            uses_encoder=False,
            shared=KeySet((CLASSIFIER,), exclude=(HEAD,)),
            trainer="client_app.trainers.fedrep:FedRepTrainer",
        ),
        MethodContract(
            name="ditto",
            label="Ditto",
            summary="FedAvg, plus a private model v pulled towards the global w by mu/2 ||v - w||^2 (Li et al. 2021)",
            private="its own personal model v",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer="client_app.trainers.ditto:DittoTrainer",
            personal_model=True,
        ),
        MethodContract(
            name="fraug",
            label="FRAug",
            summary="the classifier and a feature generator averaged; a private residual transformation "
            "augments features (Chen et al. 2023)",
            private="its transformation network, class-mean features and BatchNorm statistics",
            uses_encoder=False,
            shared=KeySet((CLASSIFIER, "aux.generator")),
            share_bn_statistics=False,
            aux_modules="models.augmentation:feature_augmenters",
            trainer="client_app.trainers.fraug:FRAugTrainer",
        ),
        MethodContract(
            name="fusefl",
            label="FuseFL",
            summary="one-shot progressive fusion: K stages, each freezing and sharing every site's next block, "
            "then a calibrated head (Tang et al. 2024)",
            private="its column's blocks before their stage, its head before calibration",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer="client_app.trainers.fusefl:FuseFLTrainer",
            strategy="strategies.fusefl:FuseFL",
            classifier_builder="models.fused_columns:build",
            round_keys="core.stages:progressive_round_keys",
            config_check="core.stages:progressive_config_problem",
            derived_settings="core.stages:progressive_settings",
            to_server=(
                Exchange("fusefl-statistics", "per-class feature statistics for calibration", may_be_empty=True),
            ),
            personal_model=True,
            default_norm="batch",  # scored as the single fused model whose head it calibrated
            needs_each_update="the server stacks each site's blocks and calibrates on each site's feature "
            "statistics: nothing is summed",
        ),
        MethodContract(
            name="feddaf",
            label="FedDAF",
            summary="FedAvg's sites; the server aggregates with mixture weights a VAE infers from the sites' "
            "normalisation statistics (FedFusion, Duan et al. 2023)",
            private="nothing",
            uses_encoder=False,
            shared=CLASSIFIER_ONLY,
            trainer=FEDAVG_TRAINER,
            strategy="strategies.feddaf:FedDAF",
            config_check="core.methods:mean_aggregation_only",
            needs_each_update="the server weighs each site's update by weights it infers from that site's "
            "normalisation statistics",
        ),
    )
}


# What the FusedSpaceFed paper reports (method.md section 6): accuracy %, after 50 rounds, under
# Dirichlet alpha = 0.05 and pathological partitions with 2 classes per site
PUBLISHED_ROUNDS = 50
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "dirichlet": {
        "pathmnist": {"fedavg": 53.45, "fedprox": 48.11, "scaffold": 39.90, "fusedspacefed": 60.77},
        "chestmnist": {"fedavg": 90.28, "fedprox": 89.93, "scaffold": 89.44, "fusedspacefed": 93.22},
        "dermamnist": {"fedavg": 67.70, "fedprox": 65.94, "scaffold": 63.35, "fusedspacefed": 69.60},
        "octmnist": {"fedavg": 41.56, "fedprox": 42.50, "scaffold": 38.69, "fusedspacefed": 46.25},
        "pneumoniamnist": {"fedavg": 69.12, "fedprox": 70.24, "scaffold": 70.01, "fusedspacefed": 72.95},
        "retinamnist": {"fedavg": 48.13, "fedprox": 49.69, "scaffold": 48.75, "fusedspacefed": 53.00},
        "breastmnist": {"fedavg": 80.25, "fedprox": 79.33, "scaffold": 77.78, "fusedspacefed": 81.61},
        "bloodmnist": {"fedavg": 53.87, "fedprox": 47.38, "scaffold": 45.68, "fusedspacefed": 58.83},
    },
    "pathological": {
        "pathmnist": {"fedavg": 20.49, "fedprox": 19.66, "scaffold": 17.16, "fusedspacefed": 50.94},
        "dermamnist": {"fedavg": 25.75, "fedprox": 24.43, "scaffold": 22.46, "fusedspacefed": 48.15},
        "retinamnist": {"fedavg": 34.37, "fedprox": 33.02, "scaffold": 26.61, "fusedspacefed": 49.26},
        "bloodmnist": {"fedavg": 18.22, "fedprox": 19.48, "scaffold": 18.10, "fusedspacefed": 30.60},
    },
}


def mean_aggregation_only(config: Mapping[str, Any]) -> str | None:
    """For a method whose server chooses its own weights for the mean (FedDAF)."""
    if str(config["aggregation"]) != "mean":
        return f"it aggregates with weights of its own, which aggregation = {config['aggregation']!r} would ignore"
    return None


def contract_for(method: str) -> MethodContract:
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method]
