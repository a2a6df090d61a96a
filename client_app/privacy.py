"""Differential privacy at the site: clipping of the shared update before it is sent.

With `dp-clip-norm = C > 0` a site sends `received + clip(local - received, C)` instead of
its trained shared arrays, where `received` are the global arrays of this round's train
message and clip scales the update by min(1, C / ||update||) (Flower's fixed clipping,
`flwr.supercore.differential_privacy.compute_clip_model_update`, as its `fixedclipping_mod`
does; that mod itself cannot be used here, since it reads the message's one array record
and our messages arrive packed, see core/transport.py). The server adds the Gaussian
noise (strategies/privacy.py).

What the clipped vector holds: every floating-point shared array, taken as one vector,
i.e. the shared parameters *and* the shared BatchNorm running means and variances (they
are computed from the site's images and leave the site too, so they must count against
the clip norm). Integer arrays (BatchNorm's `num_batches_tracked`, a count of the site's
local batches) are not sent as trained: the site returns the value it received, so they
carry nothing of the site (our BatchNorm layers use a momentum, so the counter has no
effect on the model).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm


def is_clipped_array(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.floating)


def clip_shared_update(trained: ArrayRecord, received: ArrayRecord, clip_norm: float) -> tuple[ArrayRecord, float]:
    """(the arrays to send, the update's L2 norm before clipping): `received` plus the
    update `trained - received` over the floating-point arrays, scaled to norm <= clip_norm;
    integer arrays as received. The norm is measured in float64 on the float32 values that
    are sent, so the server sees an update of norm <= clip_norm after rounding too."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    mine = {k: trained[k].numpy() for k in trained.keys()}
    theirs = {k: received[k].numpy() for k in received.keys()}
    if set(mine) != set(theirs):
        raise ValueError("the trained and received shared arrays have different keys")
    sent = {k: np.array(theirs[k]) for k, v in mine.items() if not is_clipped_array(v)}
    floats = [k for k in mine if k not in sent]
    local = [mine[k].astype(np.float64) for k in floats]
    base = [theirs[k].astype(np.float64) for k in floats]
    norm = get_norm([a - b for a, b in zip(local, base)])
    target = clip_norm
    for attempt in range(12):
        values = [a.copy() for a in local]
        if norm > target:  # (a zero update stays as it is: Flower's helper would divide by zero)
            compute_clip_model_update(values, base, target)
        cast = [v.astype(mine[k].dtype) for k, v in zip(floats, values)]
        sent_norm = get_norm([c.astype(np.float64) - b for c, b in zip(cast, base)])
        if sent_norm <= clip_norm:
            break
        # float32 rounding of `received + update` overshot the clip norm by a hair: aim lower,
        # by a margin that grows with each try (rounding does not shrink with the target)
        target -= max(2 * (sent_norm - clip_norm), 1e-7 * clip_norm) * 2**attempt
    else:
        raise RuntimeError(f"could not clip the shared update to {clip_norm} (norm {sent_norm} after rounding)")
    sent.update(zip(floats, cast))
    return ArrayRecord({k: Array(sent[k]) for k in mine}), norm
