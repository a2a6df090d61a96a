"""A quiet console: Flower log lines that say nothing our own output does not say better
are dropped by a filter on Flower's logger (attached from our apps; Flower is not patched).

- `configure_train: Sampled N nodes (out of N)` and `configure_evaluate: ...`: every round's
  progress line already gives the replies (`num_replies` in metrics.jsonl), and the line
  appears again for the messages that evaluate the last round;
- `Manually terminating ClientAppActor`: Flower's simulation ends each Ray actor that way
  at the end of every run, on purpose (a WARNING only by its level); the actors run our
  ClientApp module, which attaches the filter there too.
"""

from __future__ import annotations

import logging

FLOWER_LOGGER = "flwr"  # flwr.common.logger.LOGGER_NAME
QUIET = ("configure_train: Sampled ", "configure_evaluate: Sampled ", "Manually terminating ")


class QuietFlowerLog(logging.Filter):
    """Drops the Flower records that start with one of `QUIET`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit: keep it as it is
            return True
        return not message.startswith(QUIET)


def quiet_flower_log() -> None:
    """Attach the filter to Flower's logger, once per process."""
    logger = logging.getLogger(FLOWER_LOGGER)
    if not any(isinstance(f, QuietFlowerLog) for f in logger.filters):
        logger.addFilter(QuietFlowerLog())
