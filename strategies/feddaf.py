"""FedDAF's server side (FedFusion, "Federated Learning with Data-Agnostic Distribution
Fusion", CVPR 2023): sites train the whole classifier as in FedAvg; the server infers, from
the normalisation layers of the models the sites send, how each site's data mixes M virtual
distribution components, and aggregates with those weights instead of the example counts:
`min_w sum_m pi_m sum_k b_km L_k(w)`.

No public code or VAE specification exists; this is the smallest reading we found faithful
(docs/methods/feddaf.md says where we chose):

- A site k is described by the normalisation statistics of the model it sends: every
  BatchNorm layer's running mean and log running variance (GroupNorm's weight and bias where
  there is no BatchNorm), standardised across the round's sites: `s_k`.
- Latent variables: component weights `pi` by stick-breaking, `v_m ~ Beta(alpha, 1)`,
  `pi_m = v_m prod_{j<m} (1 - v_j)`, whose posterior is a Kumaraswamy(a_m, b_m) with the
  reparameterised sample `v = (1 - u^(1/b))^(1/a)`; memberships `b_km ~ Bernoulli(pi_m)`,
  whose posterior `q(b_k | s_k)` is an MLP encoder, sampled with the Gumbel-max trick relaxed
  (binary Concrete, temperature `TAU`).
- Decoder: `s_k ~ N(W b_k + c, I)`. ELBO: reconstruction + KL(q(b_k) || Bernoulli(pi)) +
  KL(Kumaraswamy || Beta) (Nalisnick and Smyth's series).
- Each round the VAE is fitted for `FIT_STEPS` Adam steps, warm-started from the previous
  round's (its parameters are server state, in the checkpoints).
- Aggregation weight of site k: `sum_m pi_m n_k q_km / sum_j n_j q_jm`, over components that
  hold any site, normalised to sum to one (the example-weighted mean within each component,
  mixed by pi).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from core.methods import ARRAYS_RECORD
from strategies.base import SharedModelStrategy

COMPONENTS = 4  # M, virtual distribution components
ALPHA = 1.0  # the Beta(alpha, 1) prior of the stick-breaking fractions
TAU = 0.5  # temperature of the relaxed Bernoulli (Gumbel) samples
FIT_STEPS = 200
HIDDEN = 32
STATE_PREFIX = "feddaf/"
EULER = 0.5772156649015329


class MixtureVAE(nn.Module):
    """q(b_k | s_k) (MLP), q(v) = Kumaraswamy(a, b), p(s_k | b_k) = N(W b_k + c, I)."""

    def __init__(self, features: int, components: int = COMPONENTS) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, components))
        self.decoder = nn.Linear(components, features)
        self.log_a = nn.Parameter(torch.zeros(components))
        self.log_b = nn.Parameter(torch.zeros(components))

    def stick_weights(self, v: torch.Tensor) -> torch.Tensor:
        rest = torch.cumprod(torch.cat([torch.ones(1), 1 - v[:-1]]), 0)
        return v * rest

    def expected_pi(self) -> torch.Tensor:
        """pi at the Kumaraswamy posterior's mean fractions."""
        a, b = self.log_a.exp(), self.log_b.exp()
        mean_v = b * torch.exp(torch.lgamma(1 + 1 / a) + torch.lgamma(b) - torch.lgamma(1 + 1 / a + b))
        return self.stick_weights(mean_v.clamp(1e-6, 1 - 1e-6))

    def loss(self, s: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        a, b = self.log_a.exp(), self.log_b.exp()
        u = torch.rand(a.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        v = (1 - u.pow(1 / b)).pow(1 / a).clamp(1e-6, 1 - 1e-6)  # Kumaraswamy sample
        pi = self.stick_weights(v)
        logits = self.encoder(s)
        q = torch.sigmoid(logits)
        noise = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        relaxed = torch.sigmoid((logits + torch.log(noise) - torch.log1p(-noise)) / TAU)  # binary Concrete
        reconstruction = 0.5 * (s - self.decoder(relaxed)).pow(2).sum()
        prior = pi.clamp(1e-6, 1 - 1e-6)
        kl_b = (
            q * (torch.log(q + 1e-8) - torch.log(prior)) + (1 - q) * (torch.log(1 - q + 1e-8) - torch.log1p(-prior))
        ).sum()
        return reconstruction + kl_b + kumaraswamy_beta_kl(a, b, ALPHA)

    def memberships(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.encoder(s))


def kumaraswamy_beta_kl(a: torch.Tensor, b: torch.Tensor, alpha: float, terms: int = 10) -> torch.Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)), the series of Nalisnick and Smyth (2017)."""
    beta = 1.0
    series = sum(
        1.0 / (m + a * b) * torch.exp(torch.lgamma(m / a) + torch.lgamma(b) - torch.lgamma(m / a + b))
        for m in range(1, terms + 1)
    )
    kl = (a - alpha) / a * (-EULER - torch.digamma(b) - 1 / b)
    kl = kl + torch.log(a * b) + math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta) - (b - 1) / b
    kl = kl + (beta - 1) * b * series
    return kl.sum()


def site_statistics(record: ArrayRecord) -> np.ndarray:
    """A site's description: BatchNorm running means and log variances (else the
    normalisation layers' weights and biases), flattened in key order."""
    keys = sorted(record.keys())
    running = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    chosen = running or [k for k in keys if k.rsplit(".", 2)[-2].startswith("bn") and k.endswith(("weight", "bias"))]
    parts = []
    for key in chosen:
        values = np.asarray(record[key].numpy(), dtype=np.float64).ravel()
        parts.append(np.log(np.maximum(values, 1e-8)) if key.endswith("running_var") else values)
    if not parts:
        raise ValueError("FedDAF needs normalisation layers in the shared model; none were sent")
    return np.concatenate(parts)


def mixture_weights(memberships: np.ndarray, pi: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`sum_m pi_m n_k q_km / sum_j n_j q_jm` over components that hold any site, normalised."""
    mass = memberships * counts[:, None]  # n_k q_km
    totals = mass.sum(axis=0)
    used = totals > 1e-12
    if not used.any() or pi[used].sum() <= 0:
        return counts / counts.sum()
    weights = (mass[:, used] / totals[used] * pi[used]).sum(axis=1)
    return weights / weights.sum()


class FedDAF(SharedModelStrategy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vae: MixtureVAE | None = None
        self.generator = torch.Generator().manual_seed(0)
        self.last_weights: list[float] = []

    # -- state -------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, np.ndarray]:
        state = super().checkpoint_state()
        if self.vae is not None:
            state.update({STATE_PREFIX + k: v.detach().numpy().copy() for k, v in self.vae.state_dict().items()})
            state[STATE_PREFIX + "generator"] = self.generator.get_state().numpy().copy()
        return state

    def restore_state(self, state: dict[str, np.ndarray]) -> None:
        own = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
        super().restore_state({k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)})
        if own:
            generator = own.pop("generator")
            features = own["decoder.weight"].shape[0]
            self.vae = MixtureVAE(features)
            self.vae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in own.items()})
            self.generator.set_state(torch.from_numpy(np.array(generator, dtype=np.uint8)))

    # -- aggregation -------------------------------------------------------------
    def fit(self, statistics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit the VAE to this round's site statistics (standardised across sites);
        (memberships q_km, pi)."""
        s = torch.from_numpy(statistics)
        s = ((s - s.mean(0)) / s.std(0, unbiased=False).clamp_min(1e-6)).float()
        if self.vae is None or self.vae.decoder.out_features != s.shape[1]:
            with torch.random.fork_rng():  # seeded from the strategy's own generator, leaving torch's alone
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
                self.vae = MixtureVAE(s.shape[1])
        optimizer = torch.optim.Adam(self.vae.parameters(), lr=0.01)
        for _ in range(FIT_STEPS):
            optimizer.zero_grad()
            self.vae.loss(s, self.generator).backward()
            optimizer.step()
        with torch.no_grad():
            return self.vae.memberships(s).double().numpy(), self.vae.expected_pi().double().numpy()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base aggregation; the round's row also says how far the mixture weights spread."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None and self.last_weights:
            metrics["mixture_weight_max"] = max(self.last_weights)
            metrics["mixture_weight_min"] = min(self.last_weights)
        return arrays, metrics

    def aggregate_arrays(self, server_round: int, replies: list[Message], weights: list[float]) -> ArrayRecord:
        """The base aggregation (update bound, robust rules) with the inferred mixture weights
        in place of the example counts (not under differential privacy, whose noise is
        calibrated to the plain mean: there FedDAF aggregates as FedAvg does)."""
        if len(replies) >= 2 and self.dp_clip_norm <= 0:  # DP's noise is calibrated to the plain mean
            records = [m.content[ARRAYS_RECORD] for m in replies]
            memberships, pi = self.fit(np.stack([site_statistics(r) for r in records]))
            weights = [float(w) for w in mixture_weights(memberships, pi, np.asarray(weights, dtype=np.float64))]
        self.last_weights = list(weights)
        return super().aggregate_arrays(server_round, replies, weights)
