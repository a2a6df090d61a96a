"""A quiet console (issue 28.2): Flower's per-round sampling lines and the Ray actors'
exit warnings are filtered from Flower's logger by our apps; other Flower lines pass."""

from __future__ import annotations

import logging
from logging import INFO, WARNING

import pytest
from flwr.common.logger import log

import client_app.app  # noqa: F401  (importing an app attaches the filter)
import server_app.app  # noqa: F401
from core.flower_log import FLOWER_LOGGER, QuietFlowerLog


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flower_lines():
    logger = logging.getLogger(FLOWER_LOGGER)
    handler = Collect()
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_the_apps_attach_the_filter_once():
    filters = [f for f in logging.getLogger(FLOWER_LOGGER).filters if isinstance(f, QuietFlowerLog)]
    assert len(filters) == 1


def test_sampling_lines_and_actor_exits_are_dropped_other_lines_pass(flower_lines):
    log(INFO, "configure_train: Sampled %s nodes (out of %s)", 5, 5)
    log(INFO, "configure_evaluate: Sampled %s nodes (out of %s)", 5, 5)
    log(WARNING, "Manually terminating %s", "ClientAppActor")
    log(INFO, "Starting Flower ServerApp")
    log(WARNING, "a warning that matters")
    assert flower_lines == ["Starting Flower ServerApp", "a warning that matters"]
