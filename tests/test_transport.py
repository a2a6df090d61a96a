"""Arrays travel packed into one array per message, and come back bit for bit."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from core.transport import is_packed, pack, unpack


def test_pack_and_unpack_keep_every_array_and_record():
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "classifier.w": Array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)),
                    "classifier.bn.num_batches_tracked": Array(np.array(12, dtype=np.int64)),
                    "decoder.empty": Array(np.zeros((0, 2), dtype=np.float64)),
                }
            ),
            "scaffold-c": ArrayRecord({}),  # an empty record (SCAFFOLD's c in round 1) stays a record
            "gradients": ArrayRecord({"orig": Array(np.arange(5, dtype=np.float64))}),
            "config": ConfigRecord({"server-round": 2, "method": "fusedspacefed"}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    packed = pack(content)
    assert is_packed(packed) and not is_packed(content)
    assert set(packed.array_records) == {"packed"} and len(packed["packed"].keys()) == 1
    assert dict(packed["config"]) == dict(content["config"])
    back = unpack(packed)
    assert set(back.array_records) == set(content.array_records)
    for name, record in content.array_records.items():
        assert list(back[name].keys()) == list(record.keys())
        for key in record.keys():
            a, b = record[key].numpy(), back[name][key].numpy()
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            assert b.flags.writeable
    assert dict(back["metrics"]) == dict(content["metrics"])
    assert unpack(content) is content and pack(packed) is packed  # idempotent at both ends
    no_arrays = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    assert pack(no_arrays) is no_arrays


def _packed_with_entry(shape, nbytes=8):
    """A packed content of one 8-byte buffer whose one layout entry declares `shape`."""
    import json

    from core.transport import LAYOUT_RECORD, PACKED_RECORD

    return RecordDict(
        {
            PACKED_RECORD: ArrayRecord({"bytes": Array(np.zeros(8, dtype=np.uint8))}),
            LAYOUT_RECORD: ConfigRecord({"layout": json.dumps([["arrays", "w", "<f8", shape, 0, nbytes]])}),
        }
    )


def test_a_layout_whose_size_wraps_int64_around_is_refused():
    """Security review, finding 1: numpy's int64 product of [2**61 + 1, 8] wraps around to 8,
    so this layout once passed the check and `reshape` raised ValueError (OverflowError for a
    dimension >= 2**63) out of the server's exchange, on every resume too."""
    import pytest

    from core.transport import PackingError

    for shape in ([2**61 + 1, 8], [2**63, 1], [2**64 + 1], [1] * 40):
        with pytest.raises(PackingError):
            unpack(_packed_with_entry(shape))
    assert unpack(_packed_with_entry([1, 1]))["arrays"]["w"].numpy().shape == (1, 1)


def test_an_unreadable_unpacked_array_is_refused_before_numpy_reads_it():
    """Security review, finding 2: a reply without the packing record reached Flower's
    `Array.numpy()`, which raised TypeError (another stype), ValueError (object dtype) or
    MemoryError (an .npy header declaring 8 TiB). `check_array` refuses each first."""
    import io

    import pytest

    from core.transport import PackingError, check_array

    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    check_array(good)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    huge = Array(dtype="float64", shape=(2**40,), stype="numpy.ndarray", data=header.getvalue() + b"\0" * 8)
    objects = io.BytesIO()
    np.lib.format.write_array_header_1_0(objects, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    bad = {
        "torch stype": Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=good.data),
        "object dtype": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=objects.getvalue() + b"\0" * 8),
        "8 TiB header": huge,
        "declared shape differs": Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=good.data),
        "declared dtype differs": Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray", data=good.data),
        "truncated": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=good.data[:-1]),
        "no header": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"garbage"),
    }
    for name, array in bad.items():
        with pytest.raises(PackingError):
            check_array(array)
        print(name, "refused")
