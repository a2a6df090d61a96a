"""The ClientApp: one site's round (train) and its evaluation.

Only the shared parts of the model (and, where a method defines them, the updates it
sends) go into a reply; everything else is private state that stays on the site.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client_app.evaluation import evaluate_split
from client_app.site_data import site_data_for
from client_app.state import PrivateState, state_digest
from client_app.trainers import LocalRound, Trainer, trainer_for
from client_app.training import classification_loss, classifier_gradient
from core.config import RunConfig
from core.device import resolve_device, set_threads
from models import SiteModel, build_run_model

EXTRA_PREFIX = "extra:"  # private non-model arrays (e.g. SCAFFOLD's c_i) in the state file

app = ClientApp()


class Site:
    """This node's identity, data, private state and model for one message."""

    def __init__(self, content: RecordDict, context: Context, phase: str = "train") -> None:
        self.phase = phase  # "train" starts from the state of an earlier round, "evaluate" from this round's
        values = {k: v for k, v in content["config"].items() if k != "server-round"}
        self.cfg = RunConfig.from_mapping(values)
        self.server_round = int(content["config"].get("server-round", 0))
        node = context.node_config
        self.data, meta = site_data_for(self.cfg, node)
        self.site_id = int(node.get("partition-id", meta.get("site", 0)))
        self.num_sites = int(node.get("num-partitions", meta.get("num_sites", 1)))
        self.name = str(node.get("site-name", f"site-{self.site_id}"))
        state_dir = str(node.get("state-dir", "")) or str(Path(self.cfg.results_dir) / self.cfg.run_name / "site-state")
        self.state = PrivateState(context.state, state_dir, self.cfg.run_name, self.name, self.cfg.keep_checkpoints)
        set_threads(self.cfg.num_threads)
        self.device = resolve_device(self.cfg.device)
        self.trainer: Trainer = trainer_for(self.cfg.method)
        self.model = self._build_model(content["arrays"])

    def _build_model(self, global_arrays: ArrayRecord) -> SiteModel:
        # seeded per site, so that private parts (a fresh encoder) differ between sites
        model = build_run_model(self.cfg, self.data.spec, seed=self.cfg.seed * 7919 + self.site_id)
        shared = set(self.trainer.shared_keys(model))
        incoming = global_arrays.to_torch_state_dict()
        if set(incoming) != shared:
            raise ValueError(
                f"the server sent keys that differ from this method's shared set "
                f"(missing {sorted(shared - set(incoming))[:5]}, unexpected {sorted(set(incoming) - shared)[:5]})"
            )
        before = (self.server_round + (self.phase == "evaluate")) if self.server_round else None
        saved = self.state.load(before_round=before) or {}
        if self.state.source not in ("", "memory"):
            log(
                INFO,
                "site %s: private state of round %d restored from %s (sha256 %s)",
                self.name,
                self.state.loaded_round,
                self.state.source,
                state_digest(saved),
            )
        self.extras = {k[len(EXTRA_PREFIX) :]: v for k, v in saved.items() if k.startswith(EXTRA_PREFIX)}
        private_model = {k: v for k, v in saved.items() if not k.startswith(EXTRA_PREFIX)}
        self.restored = bool(saved)
        model.load_state_dict({**model.state_dict(), **private_model, **incoming})
        return model.to(self.device)

    def private_arrays(self, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shared = set(self.trainer.shared_keys(self.model))
        private = {k: v for k, v in self.model.state_dict().items() if k not in shared}
        return {**private, **{EXTRA_PREFIX + k: v for k, v in extras.items()}}

    def shared_arrays(self) -> ArrayRecord:
        state = self.model.state_dict()
        return ArrayRecord({k: state[k].detach().cpu() for k in self.trainer.shared_keys(self.model)})

    def generator(self, purpose: int) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + self.server_round * 1009 + self.site_id * 17 + purpose) % 2**63
        return torch.Generator().manual_seed(seed)

    def gradients(self) -> ArrayRecord:
        """Classifier gradients at the current global model on a deterministic batch
        (method.md section 3): on x, and for FusedSpaceFed also on x + D(E_i(x))."""
        x, y = self.data.train.first(self.cfg.gamma_batch_size, self.generator(purpose=1))
        x, y = x.to(self.device), y.to(self.device)
        loss_fn = classification_loss(self.data.spec.multi_label)
        grads = {"orig": classifier_gradient(self.model, x, y, loss_fn, fused_input=False)}
        if self.model.fused:
            grads["fused"] = classifier_gradient(self.model, x, y, loss_fn, fused_input=True)
        return ArrayRecord(grads)


def train_round(incoming: RecordDict, context: Context) -> RecordDict:
    """One round at this site; returns the reply content (shared arrays and metrics)."""
    site = Site(incoming, context)
    content = RecordDict()
    if site.cfg.measure_gamma:
        content["gradients"] = site.gradients()
    job = LocalRound(
        cfg=site.cfg,
        data=site.data,
        device=site.device,
        generator=site.generator(purpose=0),
        server_round=site.server_round,
        incoming=incoming,
        extras=site.extras,
    )
    result = site.trainer.train(site.model, job)
    site.state.save(site.private_arrays(result.extras), site.server_round)
    content["arrays"] = site.shared_arrays()
    content["metrics"] = MetricRecord(
        {
            **result.metrics,
            "num-examples": len(site.data.train),
            "site-id": site.site_id,
            "restored": int(site.restored),
        }
    )
    for key, record in (result.outgoing or {}).items():
        content[key] = record
    return content


def evaluate_round(incoming: RecordDict, context: Context) -> RecordDict:
    """Evaluate the global model (with this site's private parts) on the site's data."""
    site = Site(incoming, context, phase="evaluate")
    task = site.data.spec.task
    test = evaluate_split(site.model, site.data.test, task, site.device)
    val = evaluate_split(site.model, site.data.val, task, site.device)
    local = evaluate_split(site.model, site.data.local_test, task, site.device)
    metrics = {f"test_{k}": v for k, v in test.items()}
    metrics.update({f"val_{k}": v for k, v in val.items()})
    metrics.update({f"local_{k}": v for k, v in local.items()})
    metrics.update({"num-examples": len(site.data.test), "site-id": site.site_id})
    return RecordDict({"metrics": MetricRecord(metrics)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=train_round(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=evaluate_round(msg.content, context), reply_to=msg)
