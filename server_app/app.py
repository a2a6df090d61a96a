"""The ServerApp: reads the run configuration and hands it to the round loop."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from core.config import RunConfig
from server_app.rounds import FederatedRun


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
        run_federation(grid, RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})}))

    return server_app


app = create_server_app()
