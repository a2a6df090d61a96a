"""The ServerApp: reads the run configuration and hands it to the round loop."""

from __future__ import annotations

from logging import ERROR
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from core.check_config import describe
from core.config import ConfigError, RunConfig
from core.flower_log import quiet_flower_log
from server_app.rounds import FederatedRun

quiet_flower_log()  # Flower's per-round sampling lines and actor-exit warnings (core/flower_log.py)


class RunConfigRejected(RuntimeError):
    """The run's configuration is invalid; raised (without the validation's traceback) so
    that Flower records the run as failed after the one-line reason has been logged."""


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg.num_server_rounds` rounds and write the results; returns the summary.

    After every round a checkpoint is written; `resume-from` continues from one. A round
    aggregates the replies that arrived within `round-timeout` and passed the strategy's
    checks when at least `min-replies` did, and records the sites that failed.
    """
    return FederatedRun(grid, cfg).start()


def create_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the context's, updated with `overrides` (for tests)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            # a ConfigError can also come from the set-up (device, resume-from's checkpoint)
            run_federation(grid, RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})}))
        except ConfigError as exc:
            # one clean line naming key, value and what is allowed; the raise makes the run fail
            log(ERROR, describe(exc))
            raise RunConfigRejected(describe(exc)) from None

    return server_app


app = create_server_app()
