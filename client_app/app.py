"""The ClientApp: a thin entry point that imports only what a message needs.

In a deployment Flower runs every message in a fresh process, so what this module
imports is paid per message. It imports Flower and the standard library only. A
message is then either handed to the site's warm worker (node config `site-worker`,
see `client_app.worker`), or run here by `client_app.site`, imported on first use
(torch, data and models), unless the site runs its ClientApps isolated from its data
(node config `site-worker-required`), where only the worker can serve it.

What leaves a site is decided in `client_app.site` (see its docstring): the shared
arrays, metrics, the records the method's contract names and, only with the site's
consent, gradients for Gamma.
"""

from __future__ import annotations

import os
import time
import traceback
from logging import ERROR, WARNING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client_app.worker import WORKER_KEY, WORKER_REQUIRED_KEY, SettingsNeeded, WorkerUnavailable, call
from core.flower_log import quiet_flower_log
from core.methods import CONFIG_RECORD
from core.secagg import STAGES
from core.settings import SettingsUnknown, held_settings, readable_settings_folder, with_held_settings
from core.transport import is_packed, pack, unpack

quiet_flower_log()  # Flower's per-round sampling lines and actor-exit warnings (core/flower_log.py)

IMPORTED = time.time()
WORKER_TIMEOUT = 24 * 3600.0  # at most; `call` waits no longer than the message's round-timeout
# pilot/start-supernode.sh marks the worker's socket `<socket>.stopping` when the site is
# asked to stop, before it stops the worker and the SuperNode (which may take seconds)
STOPPING_SUFFIX = ".stopping"

app = ClientApp()


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for one message, its arrays packed as core.transport packs them: from
    the warm worker when there is one (the packed arrays pass through untouched), else here."""
    worker = str(context.node_config.get(WORKER_KEY, "") or "")
    if worker:
        node_config = dict(context.node_config)
        try:
            timeout = worker_timeout(content, context)
            try:  # the settings go to the worker as the server sent them: with the run's first message
                return call(worker, kind, content, node_config, context.run_id, timeout)
            except SettingsNeeded as needed:  # a restarted worker without them on disk: this node's copy
                resent = with_held_settings(content, context.state)
                if resent is None:
                    raise SettingsUnknown(str(needed)) from None
                return call(worker, kind, resent, node_config, context.run_id, timeout)
        except WorkerUnavailable as exc:
            if os.path.exists(worker + STOPPING_SUFFIX):
                # the worker went because the site is stopping: do not start training here
                raise SiteStopping(
                    f"{exc}; this site is stopping (its SuperNode was asked to stop), so the message is not run"
                ) from None
            if str(context.node_config.get(WORKER_REQUIRED_KEY, "")).lower() in ("true", "1"):
                # an isolated ClientApp (its own user) cannot read the data: do not try
                raise WorkerUnavailable(
                    f"{exc}; this site runs ClientApps as a user that cannot read its data "
                    f"({WORKER_REQUIRED_KEY}), so only the site worker can serve the message: "
                    "check that it runs (its log is <state-dir>/worker.log)"
                ) from None
            log(WARNING, "%s; running this message in the ClientApp process instead", exc)
    from client_app import site
    from client_app.timeline import Timeline

    return pack(site.HANDLERS[kind](unpack(content), context, Timeline(site.IMPORTED, app_loaded=IMPORTED)))


def worker_timeout(content: RecordDict, context: Context) -> float:
    """How long to wait for the worker: no longer than the server waits for the reply
    (`round-timeout`, from the run's settings this node holds; core/settings.py)."""
    if CONFIG_RECORD not in content.config_records:  # secure aggregation's stages: their round's time
        return WORKER_TIMEOUT
    try:
        settings = held_settings(content, context.state, readable_settings_folder(context.node_config))
        return min(WORKER_TIMEOUT, float(settings["round-timeout"])) if settings else WORKER_TIMEOUT
    except Exception:  # whatever is wrong with them, the site (worker or in-process) says so
        return WORKER_TIMEOUT


class SiteStopping(RuntimeError):
    """A message that reached a site while its SuperNode was stopping."""


class SiteFailure(RuntimeError):
    """What a deployed site tells the server when a message fails: the kind of failure only."""


def reply(kind: str, msg: Message, context: Context) -> Message:
    """Arrays arrive packed into one array (core.transport) and the reply goes back the
    same way, so Flower moves two objects per message instead of one per array."""
    try:
        content = handle(kind, msg.content, context)
    except Exception as exc:
        if not str(context.node_config.get("data-path", "") or ""):
            raise  # a simulated site: its log is the operator's own console
        # a deployed site: the details (local paths, data, state) stay in the SuperNode's log
        log(ERROR, "%s message failed at this site:\n%s", kind, traceback.format_exc())
        raise SiteFailure(f"{type(exc).__name__} at the site during {kind} (details in the site's own log)") from None
    return Message(content=content if is_packed(msg.content) else unpack(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return reply("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return reply("evaluate", msg, context)


def _stage(action: str):
    def run(msg: Message, context: Context) -> Message:
        return reply(action, msg, context)

    return run


# secure aggregation's stages after training (client_app/secagg.py): `train.<stage>` messages
STAGE_HANDLERS = {f"train.{action}": app.train(action)(_stage(action)) for action in STAGES}
HANDLERS = {"train": train, "evaluate": evaluate, **STAGE_HANDLERS}  # by message type
