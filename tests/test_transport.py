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
