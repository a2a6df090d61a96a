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


def unpack(content: RecordDict) -> RecordDict:
    """Inverse of `pack` (content that is not packed comes back as it is)."""
    if not is_packed(content):
        return content
    buffer = content[PACKED_RECORD]["bytes"].numpy()
    layout = json.loads(str(content[LAYOUT_RECORD]["layout"]))
    arrays: dict[str, dict[str, Array]] = {}
    for name, key, dtype, shape, offset, nbytes in layout:
        record = arrays.setdefault(name, {})
        if key is not None:
            values = buffer[offset : offset + nbytes].copy().view(np.dtype(dtype)).reshape(shape)
            record[key] = Array(values)
    out = RecordDict()
    for name, record in content.items():
        if name not in (PACKED_RECORD, LAYOUT_RECORD):
            out[name] = record
    for name, record in arrays.items():
        out[name] = ArrayRecord(record)
    return out
