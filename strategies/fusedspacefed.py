"""FusedSpaceFed's server side: average the decoder D and classifier C only.

The encoders never arrive here; the base class refuses any reply that carries one.
"""

from strategies.base import SharedModelStrategy


class FusedSpaceFed(SharedModelStrategy):
    """Example-weighted (or, with weighted = false, plain) mean of D and C."""
