"""FedProx's server side: FedAvg's aggregation of the whole classifier.

The proximal term lives in the sites' local loss; `proximal-mu` reaches them with the
run configuration that every train message carries.
"""

from strategies.base import SharedModelStrategy


class FedProxBaseline(SharedModelStrategy):
    """Example-weighted (or, with weighted = false, plain) mean of every classifier array."""
