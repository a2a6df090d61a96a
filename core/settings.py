"""The run's settings, handed to each site once per run: the one module that owns the hand-over.

The server resolves the run's settings once (`RunConfig`: the run config, the run name,
`norm = "auto"` made concrete, what the method derives from the federation, or a resumed
run's config.json) and names them by a digest (sha256 of their canonical JSON). Every
message's `config` record carries only what changes from message to message:

    server-round       the round (Flower's FedAvg adds it)
    evaluate-received  train message: evaluate the received model before training on it
    evaluate-splits    "all", or "local" when the server evaluates the official splits itself
    settings-digest    which settings the site is to use

The settings themselves travel in a `run-settings` config record, only in the first message
the server sends to a node in the run, and again after a node failed or did not answer (it
may have restarted and lost them): `SettingsHandOver` on the server keeps that account.

A site keeps the settings a message brings in its `context.state` (Flower keeps a node's
Context for the whole run) and, where its node config names a `state-dir`, on its disk
beside its private state (`<state-dir>/run-settings/<digest>.json`), so that a SuperNode or
site worker restarted mid-run goes on without them. `site_settings` finds them (message,
memory, disk, in that order; each copy checked against the digest) and `run_config` parses
and validates them once per process and digest. A site asked to use settings it does not
hold fails that message with `SettingsUnknown` (a failed site for the server, which then
sends the settings with its next message to that node).

Nothing here imports torch, the site or the server: the thin ClientApp, the site worker,
the site and the server's round loop all read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from core.files import atomic_write_bytes
from core.methods import CONFIG_RECORD, EVALUATE_KEY, ROUND_KEY, SPLITS_KEY

if TYPE_CHECKING:
    from core.config import RunConfig

SETTINGS_RECORD = "run-settings"  # server -> site, once per run and node: the resolved run settings
DIGEST_KEY = "settings-digest"  # config record: the digest of the settings the message is to run with
#: everything a message's config record holds
MESSAGE_KEYS = (ROUND_KEY, EVALUATE_KEY, SPLITS_KEY, DIGEST_KEY)
SETTINGS_DIR = "run-settings"  # under a deployed site's state-dir: one <digest>.json per run
_MAX_PARSED = 16  # parsed settings kept per process (a site worker serves run after run)


class SettingsUnknown(RuntimeError):
    """A message names run settings this site does not hold (and does not carry them)."""


class SettingsMismatch(ValueError):
    """Settings whose content does not match the digest they came with."""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """sha256 over the settings' canonical JSON (sorted keys): equal digests, equal settings."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def message_config(digest: str, evaluate_received: bool = False, splits: str = "all") -> ConfigRecord:
    """A message's config record (Flower's strategy adds the round)."""
    return ConfigRecord({DIGEST_KEY: digest, EVALUATE_KEY: evaluate_received, SPLITS_KEY: splits})


# -- the server's side ---------------------------------------------------------------------


class SettingsHandOver:
    """Which nodes hold this run's settings: `attach` adds them to the messages of the
    nodes that may not; `settle` learns from an exchange who does now."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.digest = settings_digest(self.settings)
        self.record = ConfigRecord(self.settings)
        self.holding: set[int] = set()  # nodes whose last message (with or before the settings) succeeded

    def config(self, evaluate_received: bool = False, splits: str = "all") -> ConfigRecord:
        return message_config(self.digest, evaluate_received, splits)

    def attach(self, messages: Iterable[Message]) -> list[Message]:
        """The messages, those to nodes that do not hold the settings with them added (one new
        content per content shared, so the exchange still packs each once)."""
        messages = list(messages)
        with_settings: dict[int, RecordDict] = {}
        for msg in messages:
            if msg.metadata.dst_node_id in self.holding or SETTINGS_RECORD in msg.content.config_records:
                continue
            content = with_settings.get(id(msg.content))
            if content is None:
                content = RecordDict(dict(msg.content.items()))
                content[SETTINGS_RECORD] = self.record
                with_settings[id(msg.content)] = content
            msg.content = content
        return messages

    def settle(self, sent: Iterable[int], answered: Iterable[int]) -> None:
        """Nodes that answered hold the settings; those sent a message that failed or went
        unanswered get them again with their next one."""
        answered = set(answered)
        for node in sent:
            if node in answered:
                self.holding.add(node)
            else:
                self.holding.discard(node)


# -- the site's side -----------------------------------------------------------------------


def _checked(settings: Mapping[str, Any], digest: str, where: str) -> dict[str, Any]:
    settings = dict(settings)
    if settings_digest(settings) != digest:
        raise SettingsMismatch(f"the run settings {where} do not match their digest {digest[:12]}")
    return settings


def _settings_file(folder: str | Path, digest: str) -> Path:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise SettingsMismatch(f"{DIGEST_KEY} {digest[:80]!r} is not a sha256 digest")
    return Path(folder).expanduser() / SETTINGS_DIR / f"{digest}.json"


def wanted_digest(content: RecordDict) -> str:
    config = content.config_records.get(CONFIG_RECORD)
    digest = None if config is None else config.get(DIGEST_KEY)
    if not isinstance(digest, str) or not digest:
        raise SettingsUnknown(f"the message names no run settings (no {DIGEST_KEY} in its {CONFIG_RECORD} record)")
    return digest


def held_settings(content: RecordDict, state: RecordDict, folder: str | Path | None = None) -> dict[str, Any] | None:
    """The settings the message names, from the message itself, this node's memory (`state`)
    or `folder` (a deployed site's state-dir), in that order; None when none holds them.
    Settings found in the message or on disk are kept in `state`."""
    digest = wanted_digest(content)
    sent = content.config_records.get(SETTINGS_RECORD)
    if sent is not None:
        settings = _checked(sent, digest, "in the message")
        state.config_records[SETTINGS_RECORD] = ConfigRecord(settings)
        return settings
    kept = state.config_records.get(SETTINGS_RECORD)
    if kept is not None and settings_digest(kept) == digest:
        return dict(kept)
    if folder:
        settings = _disk_copy(_settings_file(folder, digest), digest)
        if settings is not None:
            state.config_records[SETTINGS_RECORD] = ConfigRecord(settings)
        return settings
    return None


def _disk_copy(path: Path, digest: str) -> dict[str, Any] | None:
    """The settings in `path` when it holds them for `digest`; None when it is missing,
    unreadable or does not match (then the server's copy is asked for, and written over it)."""
    try:
        return _checked(json.loads(path.read_text()), digest, f"in {path}")
    except (FileNotFoundError, ValueError, TypeError, SettingsMismatch):  # missing, not JSON, other settings
        return None


def site_settings(content: RecordDict, state: RecordDict, folder: str | Path | None = None) -> tuple[str, dict]:
    """(digest, settings) for a message at a site; the settings kept in memory and, with
    `folder`, on disk. SettingsUnknown when the site does not hold them."""
    digest = wanted_digest(content)
    settings = held_settings(content, state, folder)
    if settings is None:
        raise SettingsUnknown(
            f"this site does not hold the run settings {digest[:12]} that the message names (a site restarted "
            "without them on its disk); the server sends them with its next message"
        )
    if folder:
        run_config(digest, settings)  # settings this site would refuse are never written
        path = _settings_file(folder, digest)
        if _disk_copy(path, digest) is None:  # missing, or a damaged copy replaced
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(settings, sort_keys=True).encode())
    return digest, settings


def with_held_settings(content: RecordDict, state: RecordDict) -> RecordDict | None:
    """The message with the settings this node keeps in memory added (for a site worker that
    lost them), or None when it keeps none for the digest the message names."""
    try:
        settings = held_settings(content, state)
    except (SettingsUnknown, SettingsMismatch):
        return None
    if settings is None:
        return None
    out = RecordDict(dict(content.items()))
    out[SETTINGS_RECORD] = ConfigRecord(settings)
    return out


_PARSED: dict[str, RunConfig] = {}


def run_config(digest: str, settings: Mapping[str, Any]) -> RunConfig:
    """The settings as a checked RunConfig: parsed and validated once per process and digest."""
    parsed = _PARSED.get(digest)
    if parsed is None:
        from core.config import RunConfig

        parsed = RunConfig.from_mapping(dict(settings))
        while len(_PARSED) >= _MAX_PARSED:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[digest] = parsed
    return parsed


def readable_settings_folder(node_config: Mapping[str, Any]) -> str | None:
    """The node's state-dir when this process may read it (an isolated ClientApp may not)."""
    folder = str(node_config.get("state-dir", "") or "")
    return folder if folder and os.access(Path(folder).expanduser(), os.R_OK | os.X_OK) else None
