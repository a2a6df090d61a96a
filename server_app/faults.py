"""Exchanges that survive failing sites: a timeout per exchange, prompt replies, and a
record of which sites failed and why."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from core.console import console
from core.methods import EVALUATION_RECORD, METRICS_RECORD, SITE_ID_KEY, BadRecord, check_site_metrics
from core.transport import PackingError, check_arrays, pack, unpack

# Replies are pulled every POLL_START seconds at first, backing off to POLL_MAX: a fast
# round is noticed within tens of milliseconds, a slow one costs a few requests a second
# (Grid.send_and_receive of Flower's deployment grid sleeps 3 s between pulls).
POLL_START, POLL_MAX, POLL_GROWTH = 0.02, 0.5, 1.5
# "Late" is relative to the round's other sites: a site is reported late (one line, and
# another when its reply arrives) once it has not answered for LATE_AFTER seconds and for
# LATE_FACTOR times the median reply time of the sites that did answer; or, whether or
# not any site answered, once LATE_SHARE of round-timeout has passed. Sites that share
# CPUs (a simulation) answer in waves, which stay well within that factor. While no site
# at all has answered, one line after QUIET_WAIT seconds says the round is still waiting
# (on CPU, not on a fault). A site without a reply at the timeout is missing.
LATE_AFTER, LATE_FACTOR, LATE_SHARE, QUIET_WAIT = 30.0, 3.0, 0.5, 120.0


def late_after(answered: list[float], timeout: float) -> float:
    """Seconds after the push from which a site still waiting counts as late."""
    share = LATE_SHARE * timeout
    if not answered:
        return share
    return min(share, max(LATE_AFTER, LATE_FACTOR * statistics.median(answered)))


class TooFewReplies(RuntimeError):
    """Fewer sites replied in a round than `min-replies`; the run stops (resumable)."""


@dataclass
class Exchange:
    """One push-and-pull: the replies that arrived and the sites that failed."""

    replies: list[Message] = field(default_factory=list)  # without errors
    failed: list[str] = field(default_factory=list)  # "node N (site i): reason"
    missing: list[str] = field(default_factory=list)  # the labels of sites that did not answer in time
    sent: int = 0
    push_start: float = 0.0  # epoch seconds, for the round-cost timeline
    push_done: float = 0.0
    arrived: dict[int, float] = field(default_factory=dict)  # node -> when its reply was pulled

    def of_type(self, message_type: str) -> list[Message]:
        return [m for m in self.replies if m.metadata.message_type == message_type]


@dataclass
class SiteBook:
    """Which node is which site, learnt from earlier replies (their `site-id` metric), and
    every node the SuperLink has listed as connected during the run."""

    sites: dict[int, int] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def learn(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            for name in (METRICS_RECORD, EVALUATION_RECORD):
                record = msg.content.metric_records.get(name)
                if record is not None and SITE_ID_KEY in record:
                    self.sites[msg.metadata.src_node_id] = int(record[SITE_ID_KEY])

    def label(self, node_id: int) -> str:
        """`node N (site i)`, the one name of a site in every line and record; `node N`
        alone until the site has answered once (only its replies say which site it is)."""
        site = self.sites.get(node_id)
        return f"node {node_id}" + (f" (site {site})" if site is not None else "")


def refusal(msg: Message) -> str:
    """Why a reply cannot be read ("" when it can), its content unpacked in place. Nothing a
    site sends may stop the ServerApp: every array is checked readable (core.transport) and
    every metric a plain number, and whatever else goes wrong reading it is a failed site too."""
    try:
        msg.content = unpack(msg.content)
        check_arrays(msg.content)
        for name, record in msg.content.metric_records.items():
            check_site_metrics(name, record)
    except (PackingError, BadRecord) as exc:
        return f"malformed reply ({exc})"
    except Exception as exc:  # the last line of defence: reported, never raised
        return f"malformed reply (unreadable: {type(exc).__name__})"
    return ""


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, book: SiteBook, what: str = "") -> Exchange:
    """Push, pull until every site answered or `timeout` seconds passed, and sort the
    answers: replies, error replies (the SuperLink reports an unreachable node as one)
    and sites that never answered. Uses the Grid's public push/pull; arrays travel
    packed (core.transport) and replies come back unpacked. A late site gets a log line
    (`what`, e.g. "round 3", names the exchange), and another when its reply arrives;
    failures and missing sites are left to the caller to report, once."""
    messages = list(messages)
    result = Exchange(sent=len(messages))
    if not messages:
        return result
    packed: dict[int, object] = {}  # messages that share one content share its packed form
    for m in messages:
        m.content = packed.setdefault(id(m.content), pack(m.content))
    result.push_start = time.time()
    ids = list(grid.push_messages(messages))
    result.push_done = time.time()
    waiting = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    for m, mid in zip(messages, ids):
        if not mid:
            result.failed.append(f"{book.label(m.metadata.dst_node_id)}: the message could not be pushed")
    started = time.monotonic()
    deadline, interval = started + timeout, POLL_START
    late: set[int] = set()
    answered: list[float] = []  # seconds each site that answered took
    quiet_reported = False
    prefix = f"{what}: " if what else ""
    while waiting:
        for msg in grid.pull_messages(list(waiting)):
            node = waiting.pop(msg.metadata.reply_to_message_id, None)
            if node is None:  # a grid that does not echo message ids: match by sender
                node = msg.metadata.src_node_id
                waiting = {k: v for k, v in waiting.items() if v != node}
            result.arrived[node] = time.time()
            took = time.monotonic() - started
            if msg.has_error():  # reported once, as failed, by the caller
                result.failed.append(f"{book.label(node)}: {str(msg.error.reason)[:2000]}")
                continue
            answered.append(took)
            if node in late:
                console.print(f"[yellow]{prefix}{book.label(node)} answered late, after {took:.0f} s[/yellow]")
            reason = refusal(msg)
            if reason:
                result.failed.append(f"{book.label(node)}: {reason}")
            else:
                result.replies.append(msg)
        if not waiting or time.monotonic() >= deadline:
            break
        elapsed = time.monotonic() - started
        if elapsed >= late_after(answered, timeout):
            for node in sorted(set(waiting.values()) - late):
                late.add(node)
                others = f"; the others answered within {max(answered):.0f} s" if answered else ""
                console.print(
                    f"[yellow]{prefix}{book.label(node)} is late: no reply after {elapsed:.0f} s{others}; "
                    f"waiting up to round-timeout = {timeout:g} s[/yellow]"
                )
        elif not answered and not quiet_reported and elapsed >= QUIET_WAIT:
            quiet_reported = True
            console.print(
                f"[dim]{prefix}no reply yet from any of the {len(set(waiting.values()))} sites after "
                f"{elapsed:.0f} s: still training (sites that share CPUs, as in a simulation, answer "
                f"together), not a fault; waiting up to round-timeout = {timeout:g} s[/dim]"
            )
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(POLL_MAX, interval * POLL_GROWTH)
    for node in waiting.values():
        result.failed.append(f"{book.label(node)}: no reply within {timeout:g} s")
        result.missing.append(book.label(node))
    book.learn(result.replies)
    return result


def report_failures(what: str, failures: list[str], missing: Iterable[str] = ()) -> None:
    """One line per site that failed an exchange, in the form of its `failed_sites` entry:
    `<what>: node N (site i) is missing: no reply within T s` or `... failed: <reason>`."""
    missing = set(missing)
    for failure in failures:
        label, _, reason = failure.partition(": ")
        verb = "is missing" if label in missing and reason.startswith("no reply within") else "failed"
        console.print(f"[yellow]{what}: {label} {verb}: {reason}[/yellow]")
