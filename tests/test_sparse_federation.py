"""A full_q8 top-k update travels sparse over a real broker and the hub aggregates it exactly.

One EdgeClient trains all-MiniLM-L6-v2 with ``full_q8`` and ``top_k=0.05`` for one short round against a
real Hub over amqtt and over Mosquitto. The update goes as payload format 2 (values + indices), its
bytes on the wire are well under those of the same delta sent dense (int8; measured 2.78 MB against
22.8 MB, 0.122), and the new global version is the parent plus the decoded sparse delta.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.spec import load_model_spec
from ffm_edge.strategies import get_strategy
from ffm_edge.trainer import TorchTrainer
from ffm_edge.transport import MqttTransport
from ffm_edge.wire import INDEX_SUFFIX, decode_global, decode_update, encode_update, split_frame, unpack_envelope
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

pytestmark = pytest.mark.slow

TOP_K = 0.05
#: Wire bytes sparse / dense for this update. At most 5 % of the elements at 1 B value + 4 B index
#: (0.25 + headers); measured 0.122, because most of the kept word-embedding entries are exact zeros (rows
#: of tokens the batch never saw do not move) and zeros are not sent. Asserted with margin.
MAX_RATIO = 0.20
CHUNK = 256 * 1024
WORDS = [("a wonderful, moving film", 1), ("a dull, lifeless mess", 0), ("superb", 1), ("awful", 0)]


def test_full_q8_topk_update_travels_sparse(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    spec = dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=16)
    task = get_task("sst2")
    data = LabeledData(task, [(text, None) for text, _ in WORDS * 2], np.array([y for _, y in WORDS * 2]))
    trainer = TorchTrainer(spec, task, get_strategy("full_q8", top_k=TOP_K), batch_size=8, learning_rate=1e-4)
    assert trainer.strategy.sends_sparse
    initial = trainer.trainable_state()
    federation = "sparse-" + tmp_path.name[-8:]
    hub_transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "hub")
    settings = HubSettings(federation=federation, model=spec.name, strategy="full_q8", tau=1, chunk_size=CHUNK)
    hub = Hub(settings, hub_transport, store, initial_state=lambda: initial)
    hub.start()
    try:
        client = EdgeClient(
            spec,
            data,
            device_id="phone",
            federation=federation,
            transport=MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"phone-{tmp_path.name}"),
            trainer=trainer,
            state_dir=tmp_path / "phone",
            chunk_size=CHUNK,
            heartbeat_interval=0,
        )
        with client:
            result = client.run_round()
        assert hub.wait_for_version(1, timeout=60)
        assert hub.wait_idle(30)
    finally:
        hub.stop()
        hub_transport.close()
    try:
        frame = store.load_update(result.update_id)
        payload = unpack_envelope(frame).payload
        (header_len,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + header_len])
        assert header["__metadata__"]["ffm_format"] == "2"
        sparse_names = json.loads(header["__metadata__"]["ffm_sparse"])
        assert len(sparse_names) > 90 and all(name + INDEX_SUFFIX in header for name in sparse_names)

        meta, delta = decode_update(frame)
        assert meta.codec == "int8" and set(delta) == set(initial)
        for name, value in delta.items():  # top-k: at most ceil(5 %) of each tensor is nonzero
            assert value.shape == initial[name].shape
            assert np.count_nonzero(value) <= math.ceil(TOP_K * value.size), name
        dense = split_frame(encode_update(meta, delta), chunk_size=CHUNK, transfer_id=meta.update_id)
        dense_bytes = sum(len(c) for c in dense)
        assert result.bytes_up < MAX_RATIO * dense_bytes, (result.bytes_up, dense_bytes)
        assert dense_bytes > 22_000_000  # int8, every one of MiniLM's 22.7M weights

        record = store.get_version(1)
        assert record is not None and record.parent == 0 and record.num_updates == 1
        _, before = decode_global(store.load_version(0))
        _, after = decode_global(store.load_version(1))
        for name, value in after.items():
            expected = before[name].astype(np.float64) + delta[name]
            np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert any(not np.array_equal(after[k], before[k]) for k in after)
    finally:
        store.close()
