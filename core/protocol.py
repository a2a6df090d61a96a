"""What a training protocol changes, in one place.

`standard` is this project's recipe (docs/recipe.md). `reference` reproduces the reference
code's protocol (method.md section 7). Code asks the run's `Protocol` (`RunConfig.rules`)
about the one thing it needs instead of testing the protocol's name, so what `reference`
changes is readable here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

REFERENCE_IMAGE_SIZE = 32  # the reference code resizes every image to 32 x 32 ...
REFERENCE_CHANNELS = 3  # ... and feeds grayscale sets as 3 channels


@dataclass(frozen=True)
class Protocol:
    name: str
    reference_inputs: bool  # images fed at 32 x 32 with 3 channels (grayscale repeated)
    keeps_optimizer_state: bool  # SGD momentum buffers carried across rounds as a site's private extras
    independent_start: bool  # round 1: every site trains from its own seeded initialisation
    weighted_mean: bool  # example-weighted averaging is allowed (`weighted`); else the plain mean
    quiet_autoencoder_start: bool  # the decoder's output layer starts at zero (docs/recipe.md)
    first_warmup_trains_decoder: bool  # round 1's warm-up trains D too (there is no global decoder yet)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # settings it fixes whatever the run config says


PROTOCOLS: dict[str, Protocol] = {
    "standard": Protocol(
        name="standard",
        reference_inputs=False,
        keeps_optimizer_state=False,
        independent_start=False,
        weighted_mean=True,
        quiet_autoencoder_start=True,
        first_warmup_trains_decoder=True,
    ),
    "reference": Protocol(
        name="reference",
        reference_inputs=True,
        keeps_optimizer_state=True,
        independent_start=True,
        weighted_mean=False,
        quiet_autoencoder_start=False,
        first_warmup_trains_decoder=False,
        # averaged BatchNorm, the plain SGD autoencoder at lr 0.01 (no ramp), warm-ups of whole epochs only,
        # each site's own encoder initialisation,
        # the per-pixel MSE, a constant lr
        fixed={
            "norm": "batch",
            "ae_optimizer": "sgd",
            "lr_ae": 0.01,
            "ae_lr_ramp": 0,
            "warmup_min_steps": 0,
            "shared_encoder_init": False,
            "rec_loss": "pixel-mean",
            "lr_schedule": "constant",
        },
    ),
}
