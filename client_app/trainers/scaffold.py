"""SCAFFOLD's local round (Karimireddy et al. 2020, option II; method.md section 2).

Every local step is `w <- w - lr * (g(w) - c_i + c)` over the classifier's
parameters: c is the server control variate (it arrives in the contract's `to_site`
record; an empty record means zeros, as in the first round), c_i the site's private one (in
`job.extras`; zeros the first time). After K local steps (K = the steps actually
taken): `c_i+ = c_i - c + (w_global - w_local) / (K * lr)`. c_i+ stays on the site
(persisted by the ClientApp like any private state); only `dc_i = c_i+ - c_i` goes
back, in the contract's `to_server` record.

Optimiser: the paper's plain SGD step, so `momentum` is ignored (0) for SCAFFOLD.
Weight decay is kept: it is part of g(w) (the gradient of the regularised local
loss), so the correction and the control variates refer to the same objective.
Control variates cover the classifier's parameters only; BatchNorm running
statistics are buffers, averaged like FedAvg's.
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from client_app.trainers.base import LocalRound, RoundResult
from client_app.trainers.fedavg import FedAvgTrainer
from client_app.training import own_extras
from core.config import RunConfig
from core.methods import CLASSIFIER, RecordMismatch, contract_for
from models import SiteModel


def control_keys(model: SiteModel) -> list[str]:
    """State_dict keys of the parameters that carry control variates."""
    return [f"{CLASSIFIER}.{name}" for name, _ in model.classifier.named_parameters()]


class ScaffoldTrainer(FedAvgTrainer):
    def start(self, model: SiteModel, job: LocalRound) -> None:
        self.keys = control_keys(model)
        self.params = dict(zip(self.keys, model.classifier.parameters()))
        contract = contract_for(job.cfg.method)
        (control,), (self.control_update,) = contract.to_site, contract.to_server
        try:
            server = control.read(job.incoming, self.keys).to_torch_state_dict()
        except RecordMismatch as exc:
            raise ValueError(f"the server's message does not fit this model: {exc}") from None
        c_i = own_extras(job.extras)
        if c_i and set(c_i) != set(self.keys):
            raise ValueError("the site control variate c_i does not match the classifier's parameters")
        zeros = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.c = {k: server[k].to(p.device) if server else zeros[k] for k, p in self.params.items()}
        self.c_i = {k: c_i[k].to(p.device) if c_i else zeros[k] for k, p in self.params.items()}
        self.correction = {k: self.c[k] - self.c_i[k] for k in self.keys}
        self.w_global = {k: p.detach().clone() for k, p in self.params.items()}

    def optimizer(self, model: SiteModel, cfg: RunConfig) -> torch.optim.Optimizer:
        return super().optimizer(model, cfg.replace(momentum=0.0))

    def adjust_gradients(self, model: SiteModel) -> None:
        for key, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.correction[key])

    def finish(self, model: SiteModel, job: LocalRound, steps: int) -> RoundResult:
        if steps == 0:  # no data, no steps: nothing learned, c_i unchanged
            c_plus = self.c_i
        else:
            scale = 1.0 / (steps * job.cfg.lr)
            c_plus = {
                k: self.c_i[k] - self.c[k] + (self.w_global[k] - p.detach()) * scale for k, p in self.params.items()
            }
        dc = {k: (c_plus[k] - self.c_i[k]).cpu() for k in self.keys}
        return RoundResult(
            metrics={"local_steps": float(steps)},
            extras={k: v.detach().cpu() for k, v in c_plus.items()},
            outgoing=RecordDict({self.control_update.name: self.control_update.build(dc)}),
        )
