"""Differential privacy at the server: Gaussian noise on the averaged shared arrays.

Flower's central DP with client-side fixed clipping (`DifferentialPrivacyClientSideFixedClipping`
in flwr/serverapp/strategy/dp_fixed_clipping.py, after McMahan et al. 2018 and Geyer et
al. 2017): every site clips its update to L2 norm <= C (client_app/privacy.py), the
server takes the plain mean of the n replies and adds N(0, sigma^2) to every aggregated
floating-point value, sigma = noise_multiplier * C / n (Flower's `compute_stdv`). Flower's
wrapper divides by the number of sampled sites; here n is the number of replies actually
averaged, which is the same when every site replies and a larger sigma when some fail.

Differences from the wrapper, and why:
- the noise is drawn from a numpy Generator seeded from the run's seed and the round
  (core.seeds.dp_noise_seed) rather than numpy's global stream, so a run and its resume
  repeat exactly;
- integer arrays (BatchNorm's `num_batches_tracked`) get no noise: sites send back the
  value they received, so they carry nothing of any site;
- BatchNorm running variances are clamped at 0 after the noise (post-processing, which
  costs no privacy), since a negative variance would make the model's output NaN.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_stdv

from core.seeds import dp_noise_seed

NOISE_STD_KEY = "dp_noise_std"  # metric: the std of the noise added this round
VARIANCE_SUFFIX = "running_var"  # BatchNorm's running variance (PyTorch's state_dict name)


def noise_std(noise_multiplier: float, clip_norm: float, num_replies: int) -> float:
    return compute_stdv(noise_multiplier, clip_norm, num_replies)


def add_noise(arrays: ArrayRecord, std: float, seed: int, server_round: int) -> ArrayRecord:
    """`arrays` with N(0, std^2) added to every floating-point value (in a fixed key order)."""
    if std <= 0:
        return arrays
    rng = np.random.default_rng(dp_noise_seed(seed, server_round))
    noised: dict[str, Array] = {}
    for key in arrays.keys():
        values = arrays[key].numpy()
        if np.issubdtype(values.dtype, np.floating):
            values = (values.astype(np.float64) + rng.normal(0.0, std, values.shape)).astype(values.dtype)
            if key.endswith(VARIANCE_SUFFIX):
                values = np.maximum(values, 0)
        noised[key] = Array(np.asarray(values))
    return ArrayRecord(noised)
