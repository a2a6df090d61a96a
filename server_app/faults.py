"""Rounds that survive failing sites: a timeout per exchange, a minimum number of
replies, and a record of which sites failed and why."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid


class TooFewReplies(RuntimeError):
    """Fewer sites replied in a round than `min-replies`; the run stops (resumable)."""


@dataclass
class Exchange:
    """One send-and-receive: the replies that arrived and the sites that failed."""

    replies: list[Message] = field(default_factory=list)  # without errors
    failed: list[str] = field(default_factory=list)  # "node N (site i): reason"
    sent: int = 0


@dataclass
class SiteBook:
    """Which node is which site, learnt from earlier replies (their `site-id` metric)."""

    sites: dict[int, int] = field(default_factory=dict)

    def learn(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            if "metrics" in msg.content.metric_records and "site-id" in msg.content["metrics"]:
                self.sites[msg.metadata.src_node_id] = int(msg.content["metrics"]["site-id"])

    def label(self, node_id: int) -> str:
        site = self.sites.get(node_id)
        return f"node {node_id}" + (f" (site {site})" if site is not None else "")


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, book: SiteBook) -> Exchange:
    """Send, wait at most `timeout` seconds, and sort the answers: replies, error replies
    (the SuperLink reports an unreachable node as one) and sites that never answered."""
    messages = list(messages)
    result = Exchange(sent=len(messages))
    if not messages:
        return result
    received = list(grid.send_and_receive(messages, timeout=timeout))
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    answered: set[int] = set()
    for msg in received:
        node = dst_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            result.failed.append(f"{book.label(node)}: {msg.error.reason}")
        else:
            result.replies.append(msg)
    for msg in messages:
        if msg.metadata.dst_node_id not in answered:
            result.failed.append(f"{book.label(msg.metadata.dst_node_id)}: no reply within {timeout:g} s")
    book.learn(result.replies)
    return result
