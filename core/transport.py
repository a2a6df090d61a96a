"""How a message's arrays travel: packed into one array per message.

Flower stores and moves every Array of a message as an object of its own: in a
deployment each one is a separate request between ServerApp, SuperLink, SuperNode and
ClientApp (with TLS, SuperNode authentication and a database write on the way). A
model's state_dict is about a hundred arrays, and the round-cost timeline showed their
transfer, not the training, holding the round. So at the transport boundary (the
server's exchange, the ClientApp's entry point) the array records of a message are
packed into one uint8 array plus a `packing` config record that says where each array
lies; everything else in the system sees ordinary records. Nothing is added or removed:
the same arrays, bit for bit, in the same records.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED_RECORD = "packed"  # array record: all arrays' bytes, one after another
LAYOUT_RECORD = "packing"  # config record: {"layout": JSON [[record, key, dtype, shape, offset, nbytes], ...]}


def is_packed(content: RecordDict) -> bool:
    return LAYOUT_RECORD in content.config_records and PACKED_RECORD in content.array_records


def pack(content: RecordDict) -> RecordDict:
    """The same content with every array record folded into one array (a new RecordDict;
    `content` is left as it is)."""
    if is_packed(content) or not content.array_records:
        return content
    layout, chunks, offset = [], [], 0
    out = RecordDict()
    for name, record in content.items():
        if not isinstance(record, ArrayRecord):
            out[name] = record
            continue
        if not record.keys():
            layout.append([name, None, None, None, offset, 0])  # an empty record stays a record
        for key in record.keys():
            values = np.require(record[key].numpy(), requirements="C")
            data = values.tobytes()
            layout.append([name, key, values.dtype.str, list(values.shape), offset, len(data)])
            chunks.append(data)
            offset += len(data)
    out[PACKED_RECORD] = ArrayRecord({"bytes": Array(np.frombuffer(b"".join(chunks), dtype=np.uint8))})
    out[LAYOUT_RECORD] = ConfigRecord({"layout": json.dumps(layout)})
    return out


class PackingError(ValueError):
    """A packed message whose layout does not describe its buffer."""


NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what model arrays are


def _checked_layout(content: RecordDict) -> tuple[np.ndarray, list[tuple[str, str | None, np.dtype, tuple, int, int]]]:
    """The buffer and its layout, every entry checked: a known numeric dtype, a shape whose
    size matches its byte count, inside the buffer, no two entries overlapping. A layout
    that fails says so (PackingError) instead of making the receiver allocate or crash."""
    try:
        record = content[PACKED_RECORD]
        buffer = record["bytes"].numpy()
        layout = json.loads(str(content[LAYOUT_RECORD]["layout"]))
    except Exception as exc:
        raise PackingError(f"packed content unreadable ({type(exc).__name__})") from None
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or not isinstance(layout, list):
        raise PackingError("packed content is not one byte buffer with a list layout")
    entries, spans = [], []
    for entry in layout:
        if not isinstance(entry, list) or len(entry) != 6:
            raise PackingError(f"layout entry {str(entry)[:80]} is not [record, key, dtype, shape, offset, bytes]")
        name, key, dtype, shape, offset, nbytes = entry
        if not isinstance(name, str) or not (key is None or isinstance(key, str)):
            raise PackingError(f"layout entry {str(entry)[:80]} has a bad record or array name")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
            raise PackingError(f"layout entry for {name}/{key} has a bad offset or size")
        if key is None:
            entries.append((name, None, None, (), offset, 0))
            continue
        try:
            kind = np.dtype(dtype)
        except (TypeError, ValueError):
            raise PackingError(f"layout entry for {name}/{key} has dtype {str(dtype)[:20]!r}") from None
        if kind.kind not in NUMERIC_KINDS or not isinstance(shape, list):
            raise PackingError(f"layout entry for {name}/{key} has dtype {kind} or shape {str(shape)[:40]}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise PackingError(f"layout entry for {name}/{key} has shape {str(shape)[:40]}")
        if int(np.prod(shape, dtype=np.int64)) * kind.itemsize != nbytes or offset + nbytes > buffer.size:
            raise PackingError(f"layout entry for {name}/{key} does not fit the buffer ({nbytes} bytes at {offset})")
        entries.append((name, key, kind, tuple(shape), offset, nbytes))
        spans.append((offset, nbytes))
    spans.sort()
    if any(start < prev_start + prev_size for (prev_start, prev_size), (start, _) in zip(spans, spans[1:])):
        raise PackingError("layout entries overlap")
    return buffer, entries


def unpack(content: RecordDict) -> RecordDict:
    """Inverse of `pack` (content that is not packed comes back as it is)."""
    if not is_packed(content):
        return content
    buffer, layout = _checked_layout(content)
    arrays: dict[str, dict[str, Array]] = {}
    for name, key, dtype, shape, offset, nbytes in layout:
        record = arrays.setdefault(name, {})
        if key is not None:
            values = buffer[offset : offset + nbytes].copy().view(dtype).reshape(shape)
            record[key] = Array(values)
    out = RecordDict()
    for name, record in content.items():
        if name not in (PACKED_RECORD, LAYOUT_RECORD):
            out[name] = record
    for name, record in arrays.items():
        out[name] = ArrayRecord(record)
    return out
