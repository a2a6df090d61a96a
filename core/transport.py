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

import io
import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

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
MAX_DIMS = 32  # numpy's own limit is 64; no model array here has more than 4


def _fits(shape: object, itemsize: int, nbytes: int) -> bool:
    """`shape` is a list or tuple of at most MAX_DIMS non-negative ints whose size, in exact
    integers (numpy's int64 product wraps around), is `nbytes` of `itemsize`."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
        return False
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return False
    return math.prod(shape) * itemsize == nbytes


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
        kind = _numeric_dtype(dtype)
        if kind is None or not isinstance(shape, list):
            raise PackingError(
                f"layout entry for {name}/{key} has dtype {str(dtype)[:20]!r} or shape {str(shape)[:40]}"
            )
        if not _fits(shape, kind.itemsize, nbytes) or offset + nbytes > buffer.size:
            raise PackingError(
                f"layout entry for {name}/{key} has shape {str(shape)[:40]}, which does not fit the buffer "
                f"({nbytes} bytes at {offset})"
            )
        entries.append((name, key, kind, tuple(shape), offset, nbytes))
        spans.append((offset, nbytes))
    spans.sort()
    if any(start < prev_start + prev_size for (prev_start, prev_size), (start, _) in zip(spans, spans[1:])):
        raise PackingError("layout entries overlap")
    return buffer, entries


def _numeric_dtype(dtype: object) -> np.dtype | None:
    """The numpy dtype `dtype` names when it is a plain numeric one (no fields, no
    sub-arrays, no objects), else None."""
    if not isinstance(dtype, str) or len(dtype) > 16:
        return None
    try:
        kind = np.dtype(dtype)
    except Exception:  # numpy's dtype parser raises several kinds of error
        return None
    if kind.kind not in NUMERIC_KINDS or kind.hasobject or kind.fields is not None or kind.shape != ():
        return None
    return kind


def check_array(array: Array) -> None:
    """An Array as Flower carries it (an .npy image plus its declared dtype and shape) that
    can be read without surprises: numpy stype, an .npy header of a plain numeric dtype
    whose shape matches the bytes that follow, and the declared dtype and shape equal to
    the header's. `Array.numpy()` of an unchecked Array can raise TypeError or ValueError,
    or allocate what the header declares (MemoryError); after this check it cannot."""
    if not isinstance(array, Array) or array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        raise PackingError(f"an array of serialisation type {str(getattr(array, 'stype', None))[:40]!r}")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read_header[version](stream)
    except Exception as exc:  # a short, malformed or over-long header, or another .npy version
        raise PackingError(f"an array whose .npy header is unreadable ({type(exc).__name__})") from None
    kind = _numeric_dtype(dtype.str)
    if kind is None or kind != dtype:
        raise PackingError(f"an array of dtype {str(dtype)[:20]}")
    if not _fits(shape, kind.itemsize, len(array.data) - stream.tell()):
        raise PackingError(f"an array whose shape {str(shape)[:40]} does not fit its {len(array.data)} bytes")
    if tuple(array.shape) != tuple(shape) or array.dtype != str(dtype):
        raise PackingError(
            f"an array declared as {str(array.dtype)[:20]}{str(array.shape)[:40]} that holds {dtype}{list(shape)}"
        )


def check_arrays(content: RecordDict) -> None:
    """`check_array` for every array of every array record (PackingError names the first bad one)."""
    for name, record in content.array_records.items():
        for key in record.keys():
            try:
                check_array(record[key])
            except PackingError as exc:
                raise PackingError(f"{name}/{str(key)[:80]}: {exc}") from None


def unpack(content: RecordDict) -> RecordDict:
    """Inverse of `pack` (content that is not packed comes back as it is). A packed
    content whose layout does not describe its buffer raises PackingError, and nothing else."""
    if not is_packed(content):
        return content
    try:
        return _unpacked(content)
    except PackingError:
        raise
    except Exception as exc:  # whatever a hostile layout finds beyond the checks: still a refusal
        raise PackingError(f"packed content could not be unpacked ({type(exc).__name__})") from None


def _unpacked(content: RecordDict) -> RecordDict:
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
