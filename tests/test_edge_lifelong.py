"""Lifelong learning on the edge: data that keep arriving while a device takes part in a federation.

The data helpers (``tail``, ``concat_data``, ``reveal_stream``) are checked on their own; the client is
checked against a real hub (τ = 1, so every update makes a version) over the in-memory broker and over
real MQTT brokers: ``add_data`` grows the next update's ``num_samples``, ``max_local_examples`` keeps the
newest examples only, a stream is taken one batch per round, and a round trains on a snapshot that a
concurrent ``add_data`` cannot change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ffm_edge.cli import build_parser as edge_parser
from ffm_edge.cli import main as edge_main
from ffm_edge.client import EdgeClient, ProgressEvent, RoundResult
from ffm_edge.data import LabeledData, TextPair, check_same_task, concat_data, get_task, reveal_stream
from ffm_edge.errors import ConfigError, DataError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

FED = "life"
SST2 = get_task("sst2")


def texts(start: int, stop: int) -> LabeledData:
    """Examples ``start..stop-1`` of an endless stream, each text naming its index (to see which are kept)."""
    words = ("a wonderful, moving film", "a dull, lifeless mess")
    inputs: list[TextPair] = [(f"{words[i % 2]} #{i}", None) for i in range(start, stop)]
    return LabeledData(SST2, inputs, np.array([1 - i % 2 for i in range(start, stop)]), source=f"s{start}")


def images(n: int, size: int = 8, value: int = 0) -> LabeledData:
    return LabeledData(get_task("digits"), np.full((n, size, size, 3), value, np.uint8), np.arange(n) % 10)


def ids(data: LabeledData) -> list[int]:
    return [int(a.rsplit("#", 1)[1]) for a, _ in data.texts]


# ---------------------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------------------


def test_tail_keeps_the_newest_rows_as_a_copy() -> None:
    data = texts(0, 5)
    assert ids(data.tail(2)) == [3, 4]
    assert ids(data.tail(9)) == [0, 1, 2, 3, 4]
    assert len(data.tail(0)) == 0
    pics = images(4, value=7)
    last = pics.tail(3)
    assert last.images.shape == (3, 8, 8, 3) and list(last.labels) == [1, 2, 3]
    last.images[...] = 0
    assert int(pics.images.max()) == 7  # a copy, not a view of the caller's array
    with pytest.raises(ConfigError, match="non-negative"):
        data.tail(-1)


def test_concat_data_joins_text_and_images_of_one_task() -> None:
    joined = concat_data([texts(0, 2), texts(2, 5), texts(5, 5)])
    assert ids(joined) == [0, 1, 2, 3, 4] and list(joined.labels) == [1, 0, 1, 0, 1]
    assert joined.source == "s0 + s2 + s5"
    assert concat_data([joined, texts(5, 6)]).source == "s0 + s2 + s5"  # repeated joins stay short
    pics = concat_data([images(2, value=1), images(3, value=2)])
    assert pics.images.shape == (5, 8, 8, 3) and pics.images.dtype == np.uint8
    assert [int(x) for x in pics.images[:, 0, 0, 0]] == [1, 1, 2, 2, 2]
    with pytest.raises(DataError, match="different shapes"):
        concat_data([images(2), images(2, size=4)])
    with pytest.raises(ConfigError, match="another task"):
        concat_data([texts(0, 2), images(2)])
    with pytest.raises(ConfigError):
        concat_data([])


def test_check_same_task_says_what_differs() -> None:
    check_same_task(SST2, get_task("SST-2"))
    with pytest.raises(ConfigError, match=r"task 'cola' instead of 'sst2'.*label names"):
        check_same_task(SST2, get_task("cola"))
    with pytest.raises(ConfigError, match="modality 'image' instead of 'text'"):
        check_same_task(SST2, get_task("digits"))


def test_reveal_stream_yields_each_row_once_then_stops() -> None:
    stream = reveal_stream(texts(0, 10), initial=4, per_round=3)
    assert [ids(batch) for batch in stream] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(b) for b in reveal_stream(texts(0, 3), initial=5, per_round=1)] == [3]
    for initial, per_round in ((0, 1), (1, 0), (True, 1)):
        with pytest.raises(ConfigError):  # checked at the call, not at the first next()
            reveal_stream(texts(0, 3), initial, per_round)


# ---------------------------------------------------------------------------------------------------------
# The client against a real hub
# ---------------------------------------------------------------------------------------------------------


Federation = Callable[..., AbstractContextManager[tuple[EdgeClient, Hub, SqliteStore]]]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """``with federation(data, make_transport=None, **client_options) as (client, hub, store)``.

    A hub (τ = 1: every update makes a version) and one connected edge client, over the in-memory broker
    unless ``make_transport`` is given. Leaving the block waits for the hub to settle and stops it; the
    store stays open until the test ends, for the checks.
    """
    stores: list[SqliteStore] = []

    @contextmanager
    def start(
        data: LabeledData, make_transport: Callable[[str], Transport] | None = None, **client_options: Any
    ) -> Iterator[tuple[EdgeClient, Hub, SqliteStore]]:
        if make_transport is None:
            broker = InMemoryBroker()

            def make_transport(client_id: str) -> Transport:
                return InMemoryTransport(broker, client_id)

        client = EdgeClient(
            "minilm-l6-v2",
            data,
            device_id="phone",
            federation=FED,
            transport=make_transport("phone"),
            state_dir=tmp_path / "phone",
            batch_size=4,
            heartbeat_interval=0,
            receipt_timeout=30,
            version_timeout=60,
            pull_timeout=60,
            **client_options,
        )
        state = client.trainer.trainable_state()  # the hub starts from the same LoRA initialisation
        hub_transport = make_transport("hub")
        hub_transport.connect()
        store = SqliteStore(tmp_path / "hub")
        stores.append(store)
        hub = Hub(HubSettings(federation=FED, tau=1), hub_transport, store, initial_state=lambda: state)
        hub.start()
        try:
            with client:
                yield client, hub, store
            assert hub.wait_idle(30)
        finally:
            hub.stop()
            hub_transport.close()

    yield start
    for store in stores:
        store.close()


def hub_samples(store: SqliteStore, results: Iterable[RoundResult]) -> list[int]:
    """``num_samples`` of each receipted update as the hub's store recorded it."""
    samples = []
    for result in results:
        record = store.get_update(result.update_id)
        assert record is not None
        samples.append(record.num_samples)
    return samples


def test_add_data_grows_the_next_update(federation: Federation) -> None:
    with federation(texts(0, 4)) as (client, _hub, store):
        first = client.run_round()
        assert client.add_data(texts(4, 7)) == 7
        assert client.add_data(texts(7, 7)) == 7  # nothing new: nothing changes
        second = client.run_round()
    assert [first.num_samples, second.num_samples] == [4, 7]
    assert hub_samples(store, [first, second]) == [4, 7]
    assert [v.version for v in store.versions()] == [0, 1, 2]


def test_window_keeps_only_the_newest_examples(federation: Federation) -> None:
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="max_local_examples"):
            EdgeClient("minilm-l6-v2", texts(0, 4), device_id="phone", max_local_examples=bad)  # type: ignore[arg-type]
    with federation(texts(0, 8), max_local_examples=5) as (client, _hub, store):
        assert ids(client.data) == [3, 4, 5, 6, 7]  # the initial data are windowed too
        assert client.add_data(texts(8, 10)) == 5
        assert ids(client.data) == [5, 6, 7, 8, 9]
        assert client.add_data(texts(10, 20)) == 5  # a batch larger than the window: its newest 5
        assert ids(client.data) == [15, 16, 17, 18, 19]
        result = client.run_round()
    assert result.num_samples == 5 and hub_samples(store, [result]) == [5]


def test_data_of_another_task_is_rejected(tmp_path: Path) -> None:
    client = EdgeClient(
        "minilm-l6-v2", texts(0, 4), device_id="phone", federation=FED, state_dir=tmp_path / "phone"
    )  # no connection needed to add data
    cola = LabeledData(get_task("cola"), [("it good", None)], np.array([0]))
    for other, match in ((cola, "task 'cola' instead of 'sst2'"), (images(2), "modality 'image'")):
        with pytest.raises(ConfigError, match=match):
            client.add_data(other)
    with pytest.raises(ConfigError, match="takes a LabeledData"):
        client.add_data([("good", None)])  # type: ignore[arg-type]
    assert len(client.data) == 4


class Arrivals:
    """A live source: each pull (``next``) gives what arrived since the last one, None when nothing did."""

    def __init__(self, batches: Iterator[LabeledData]) -> None:
        self.items: Iterator[LabeledData | None] = (x for batch in batches for x in (batch, None))
        self.pulls: list[int | None] = []  # per pull: the batch size, 0 for None, None once dry

    def __iter__(self) -> Arrivals:
        return self

    def __next__(self) -> LabeledData | None:
        try:
            item = next(self.items)
        except StopIteration:
            self.pulls.append(None)
            raise
        self.pulls.append(0 if item is None else len(item))
        return item


def test_stream_gives_one_batch_per_round_and_may_run_dry(federation: Federation) -> None:
    stream = reveal_stream(texts(0, 10), initial=2, per_round=3)
    arrivals = Arrivals(stream)
    with federation(next(stream), data_stream=arrivals) as (client, _hub, store):
        sizes = []
        for _ in range(8):  # 3 batches, 3 rounds with nothing new, then the stream is dry: still trains
            sizes.append(client.run_round().num_samples)
    assert sizes == [5, 5, 8, 8, 10, 10, 10, 10]
    assert arrivals.pulls == [3, 0, 3, 0, 2, 0, None]  # one pull per round, none after it ran dry
    assert [v.version for v in store.versions()] == list(range(9))


def test_add_data_during_a_round_waits_for_the_next_round(federation: Federation) -> None:
    training = threading.Event()
    added = threading.Event()

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == "train" and not training.is_set():
            training.set()  # the round is training: let the app thread add data now
            assert added.wait(30)

    results: list[RoundResult] = []
    errors: list[BaseException] = []

    def round_in_background(client: EdgeClient) -> None:
        try:
            results.append(client.run_round())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    with federation(texts(0, 8), on_progress=on_progress) as (client, _hub, store):
        worker = threading.Thread(target=round_in_background, args=(client,))
        worker.start()
        assert training.wait(60)
        size = client.add_data(texts(8, 14))  # another thread, mid-training
        added.set()
        worker.join(60)
        assert not errors, errors
        assert size == 14 and len(client.data) == 14
        assert results[0].num_samples == 8  # the round's snapshot, not the data at its end
        assert results[0].train.num_samples == 8
        results.append(client.run_round())
    assert [r.num_samples for r in results] == [8, 14]
    assert hub_samples(store, results) == [8, 14]


@pytest.mark.slow
def test_streamed_device_over_a_real_broker(tmp_path: Path, mqtt_broker: ManagedBroker, federation: Federation) -> None:
    def make(client_id: str) -> Transport:
        return MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"{client_id}-{tmp_path.name}")

    stream = reveal_stream(texts(0, 14), initial=3, per_round=4)
    with federation(next(stream), make, data_stream=stream, max_local_examples=10) as (
        client,
        hub,
        store,
    ):
        results = client.run_forever(rounds=4)
        assert hub.wait_idle(30)
        assert hub.current_version == 4
    assert [r.num_samples for r in results] == [7, 10, 10, 10]  # 3+4, 11 -> window of 10, 14 -> 10, dry
    assert hub_samples(store, results) == [7, 10, 10, 10]
    versions = store.versions()
    assert [v.version for v in versions] == [0, 1, 2, 3, 4]
    for result, version in zip(results, versions[1:], strict=True):
        record = store.get_update(result.update_id)
        assert record is not None and record.status == "aggregated" and record.aggregated_into == version.version
    assert ids(client.data) == list(range(4, 14))


# ---------------------------------------------------------------------------------------------------------
# ffm-edge run
# ---------------------------------------------------------------------------------------------------------


def test_run_help_explains_the_stream_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        edge_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for word in ("--stream-initial", "--stream-per-round", "--max-local-examples", "lifelong", "newest"):
        assert word in text
    args = edge_parser().parse_args(["run", "--stream-initial", "8", "--stream-per-round", "4"])
    assert (args.stream_initial, args.stream_per_round, args.max_local_examples) == (8, 4, None)
    with pytest.raises(SystemExit):
        edge_parser().parse_args(["run", "--max-local-examples", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_run_needs_both_stream_flags(caplog: pytest.LogCaptureFixture) -> None:
    assert edge_main(["run", "--stream-initial", "8", "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "--stream-initial and --stream-per-round go together" in caplog.text
