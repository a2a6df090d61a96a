"""FedAvg's server side: average the whole classifier."""

from strategies.base import SharedModelStrategy


class FedAvgBaseline(SharedModelStrategy):
    """Example-weighted mean of every classifier array."""
