"""FedBN's server side: average the classifier without its BatchNorm layers.

The shared key set (from the FedBN trainer) leaves out every BatchNorm parameter and
buffer, so the base class refuses any reply that carries one; each site keeps its own.
The global model saved at the end therefore has no BatchNorm layers: a site
evaluates it with its own.
"""

from strategies.base import SharedModelStrategy


class FedBNBaseline(SharedModelStrategy):
    """Example-weighted (or plain) mean of the classifier's non-BatchNorm arrays."""
