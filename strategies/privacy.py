"""Differential privacy at the server: Gaussian noise on the averaged shared arrays.

Flower's central DP with client-side fixed clipping (`DifferentialPrivacyClientSideFixedClipping`
in flwr/serverapp/strategy/dp_fixed_clipping.py, after McMahan et al. 2018 and Geyer et
al. 2017): every site clips its update to L2 norm <= C (client_app/privacy.py), the
server takes the plain mean of the n replies and adds N(0, sigma^2) to every aggregated
floating-point value, sigma = noise_multiplier * C / n (Flower's `compute_stdv`). Flower's
wrapper divides by the number of sampled sites; here n is the number of replies actually
averaged, which is the same when every site replies and a larger sigma when some fail.

Differences from the wrapper, and why:
- the noise comes from a generator seeded from the operating system's entropy when the run
  starts (`NoiseSource`), never from the run configuration, which every site receives: with
  a seed-derived generator any site could replay the noise and subtract it. Its state is
  kept in the server's checkpoints only, so a resumed run draws what the uninterrupted
  run would have drawn;
- integer arrays (BatchNorm's `num_batches_tracked`) get no noise: sites send back the
  value they received, so they carry nothing of any site;
- BatchNorm running variances are clamped at 0 after the noise (post-processing, which
  costs no privacy), since a negative variance would make the model's output NaN.

The privacy spent is tracked with Flower's Renyi-DP accountant
(`flwr.supercore.privacy_accounting.RdpAccountant`, which needs `flwr[dp]`): one Gaussian
release per round with the run's noise multiplier, site-level add-or-remove-one neighbours,
no amplification by sampling claimed (sites are not Poisson-sampled); epsilon at `dp-delta`
after every round goes into metrics.jsonl and summary.json.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_stdv

NOISE_STD_KEY = "dp_noise_std"  # metric: the std of the noise added this round
EPSILON_KEY = "dp_epsilon"  # metric: the privacy spent so far (epsilon at dp-delta)
VARIANCE_SUFFIX = "running_var"  # BatchNorm's running variance (PyTorch's state_dict name)
STATE_PREFIX = "dp:"  # the strategy-state keys of the noise generator and the accountant


def noise_std(noise_multiplier: float, clip_norm: float, num_replies: int) -> float:
    return compute_stdv(noise_multiplier, clip_norm, num_replies)


def _as_array(value: object) -> np.ndarray:
    """JSON-able state as a uint8 array (what a checkpoint's strategy state holds)."""
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8).copy()


def _from_array(values: np.ndarray) -> object:
    return json.loads(bytes(np.asarray(values, dtype=np.uint8)).decode())


class NoiseSource:
    """The server's Gaussian noise: seeded from OS entropy, so nobody holding the run's
    configuration can reproduce it; `state()` / `restore()` carry it through checkpoints."""

    def __init__(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence()))  # OS entropy

    def state(self) -> np.ndarray:
        return _as_array(self.rng.bit_generator.state)

    def restore(self, values: np.ndarray) -> None:
        self.rng.bit_generator.state = _from_array(values)

    def add_noise(self, arrays: ArrayRecord, std: float) -> ArrayRecord:
        """`arrays` with N(0, std^2) added to every floating-point value (in a fixed key order)."""
        if std <= 0:
            return arrays
        noised: dict[str, Array] = {}
        for key in arrays.keys():
            values = arrays[key].numpy()
            if np.issubdtype(values.dtype, np.floating):
                values = (values.astype(np.float64) + self.rng.normal(0.0, std, values.shape)).astype(values.dtype)
                if key.endswith(VARIANCE_SUFFIX):
                    values = np.maximum(values, 0)
            noised[key] = Array(np.asarray(values))
        return ArrayRecord(noised)


class PrivacyLedger:
    """Epsilon spent so far, by Flower's RDP accountant: one Gaussian release of the mean
    per round with the run's noise multiplier. No amplification by sampling is claimed, so
    the sites' count only labels the releases: the population is the number of sites that
    replied in the first private round."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        try:
            import dp_accounting  # noqa: F401  (the backend Flower's accountant loads)
            from flwr.supercore import privacy_accounting
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
        except ImportError as err:  # dp-accounting is Flower's optional `dp` extra
            raise ImportError(
                "dp-noise-multiplier > 0 reports the privacy spent with Flower's RDP accountant, "
                f"which needs Flower's dp extra: pip install 'flwr[dp]' ({err})"
            ) from err
        self.types = privacy_accounting
        self.make_accountant = RdpAccountant
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = None

    def _accountant(self, population: int):
        if self.accountant is None:
            t = self.types
            self.accountant = self.make_accountant(
                t.PrivacyConfig(
                    target_delta=self.delta,
                    population_size=population,
                    neighboring_relation=t.NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=t.SamplingMethod.NO_AMPLIFICATION,
                )
            )
        return self.accountant

    def spend_round(self, num_replies: int) -> float:
        """Compose this round's release; the epsilon spent so far."""
        accountant = self._accountant(num_replies)
        population = accountant.config.population_size
        event = self.types.GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_size=max(1, min(num_replies, population)),
            population_size=population,
        )
        accountant.compose(event)
        return accountant.get_epsilon(self.delta)

    def state(self) -> np.ndarray | None:
        return None if self.accountant is None else _as_array(self.accountant.state_dict())

    def restore(self, values: np.ndarray) -> None:
        state = _from_array(values)
        self._accountant(int(state["config"]["population_size"])).load_state_dict(state)
