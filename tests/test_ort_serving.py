"""The hub serves ORT training artifacts to devices that ask for them (issue 6).

A real hub with an :class:`ArtifactService` builds the artifacts from its global version on the first request
and sends them over a real broker (Mosquitto and amqtt); a device process in which ``import torch`` fails
fetches them, checks every file, trains one round with them and the hub accepts the update. Refusals are
typed, and a transfer that is damaged, truncated, incomplete or unsafe never reaches the trainer: a scripted
hub on a real broker sends exactly the bad bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from ort_helpers import device_env, require_ort, short_spec

from ffm_edge.data import get_task
from ffm_edge.errors import ArtifactRejectedError, ConfigError, OrtArtifactError, TransportError
from ffm_edge.ort.archive import pack_folder, unpack_archive
from ffm_edge.ort.fetch import fetch_artifacts
from ffm_edge.ort.manifest import MANIFEST_NAME, ArtifactManifest, TensorInfo, file_sha256, load_manifest
from ffm_edge.spec import load_model_spec
from ffm_edge.transport import MqttTransport, Transport
from ffm_edge.wire import (
    ArtifactMeta,
    ArtifactRequest,
    Topics,
    decode_message,
    encode_artifacts,
    split_frame,
)
from ffm_hub.artifacts import ArtifactService
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

FED = "serving"


def _transport(broker: ManagedBroker, name: str) -> MqttTransport:
    return MqttTransport(broker.host, broker.port, client_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}")


@contextlib.contextmanager
def running_hub(
    broker: ManagedBroker,
    store_dir: Path,
    initial: dict[str, np.ndarray],
    *,
    federation: str = FED,
    artifacts: ArtifactService | None = None,
    model: str = "minilm-l6-v2",
) -> Iterator[tuple[Hub, SqliteStore]]:
    transport = _transport(broker, "hub")
    transport.connect()
    store = SqliteStore(store_dir)
    hub = Hub(
        HubSettings(federation=federation, model=model, tau=1),
        transport,
        store,
        initial_state=lambda: initial,
        artifacts=artifacts,
    )
    hub.start()
    try:
        yield hub, store
    finally:
        hub.stop()
        transport.close()
        store.close()


# -- the real path: a hub builds and sends, a device without torch fetches and trains ----------------------
_INITIAL: dict[str, np.ndarray] = {}


def _hub_initial_state() -> dict[str, np.ndarray]:
    """A fresh lora trainer's tensors plus 0.01, so values from the hub differ from any fresh start."""
    if not _INITIAL:
        from ffm_edge.trainer import TorchTrainer

        trainer = TorchTrainer(short_spec(), get_task("sst2"), "lora", seed=0)
        _INITIAL.update({k: v + np.float32(0.01) for k, v in trainer.trainable_state().items()})
    return dict(_INITIAL)


_DEVICE = """
import dataclasses, json, sys, time
import numpy as np
from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.ort.fetch import fetch_artifacts_from_hub
from ffm_edge.spec import load_model_spec

url, out, state, federation = sys.argv[1:5]
spec = dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=32)
started = time.perf_counter()
manifest = fetch_artifacts_from_hub(url, out, federation=federation, device_id="ort-dev", model=spec.name,
                                    task="sst2", strategy="lora", idle_timeout=30)
fetch_s = time.perf_counter() - started
texts = [(f"a wonderful film {i}" if i % 2 else f"a dull mess {i}", None) for i in range(16)]
data = LabeledData(get_task("sst2"), texts, np.array([i % 2 for i in range(16)]))
client = EdgeClient(spec, data, device_id="ort-dev", federation=federation, broker=url, runtime="ort",
                    ort_artifacts=out, batch_size=8, state_dir=state, threads=1, heartbeat_interval=0)
with client:
    result = client.run_round()
print("RESULT " + json.dumps({
    "fetch_s": fetch_s,
    "global_version": manifest.global_version,
    "runtime": client.runtime,
    "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None),
    "update_id": result.update_id,
    "base_version": result.base_version,
    "loss": result.train.mean_loss,
}))
"""


@pytest.mark.slow
def test_a_device_without_torch_fetches_artifacts_from_the_hub_and_trains(
    mqtt_broker: ManagedBroker, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require_ort()
    from ffm_edge.ort.trainer import OrtTrainer

    spec = short_spec()
    initial = _hub_initial_state()
    # One cache for the whole session: the first broker's hub builds, the second serves the build from disk.
    cache = tmp_path_factory.getbasetemp() / "ort-serving-cache"
    service = ArtifactService(spec, "sst2", cache, strategies=("lora", "head"))
    with running_hub(mqtt_broker, tmp_path / "hub", initial, artifacts=service) as (hub, store):
        env = device_env(tmp_path, block_torch=True)
        out = tmp_path / "device" / "ort-artifacts"
        proc = subprocess.run(
            [sys.executable, "-c", _DEVICE, mqtt_broker.url, str(out), str(tmp_path / "device"), FED],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        result = json.loads(lines[-1][len("RESULT ") :])
        assert hub.wait_idle(30)
        versions = store.versions()
        update = store.get_update(result["update_id"])

    assert result["torch_loaded"] is False and result["runtime"] == "ort"
    # The files verify, and they are what the hub holds: its global version, its trainable values.
    manifest = load_manifest(out, verify=True)
    assert set(manifest.files) | {MANIFEST_NAME} == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    }
    assert manifest.global_version == 0 == result["global_version"]
    assert (manifest.spec, manifest.strategy, manifest.task) == ("minilm-l6-v2", "lora", "sst2")
    values = OrtTrainer(out, get_task("sst2"), spec=spec, strategy="lora").trainable_state()
    assert sorted(values) == sorted(initial)
    for name, value in values.items():
        np.testing.assert_allclose(value, initial[name], atol=1e-6, err_msg=name)
    # The hub accepted the update trained on them, and aggregated it (tau = 1).
    assert update is not None and update.device == "ort-dev" and result["base_version"] == 0
    assert [v.version for v in versions] == [0, 1] and update.aggregated_into == 1
    assert np.isfinite(result["loss"])
    assert service.transfers == 1 and service.builds <= 1
    size = (cache / next(p.name for p in cache.iterdir()) / "lora" / "v0000000000.ffma").stat().st_size
    print(f"\n{mqtt_broker.kind}: fetched {size / 1e6:.1f} MB of artifacts in {result['fetch_s']:.1f}s "
          f"({'built on the hub' if service.builds else 'from the hub cache'})")  # fmt: skip


# -- refusals ---------------------------------------------------------------------------------------------
def _ask(
    broker: ManagedBroker,
    out: Path,
    federation: str,
    *,
    model: str = "minilm-l6-v2",
    task: str = "sst2",
    strategy: str = "lora",
    runtime: str = "ort",
) -> ArtifactRejectedError:
    transport = _transport(broker, "asker")
    try:
        with pytest.raises(ArtifactRejectedError) as caught:
            fetch_artifacts(
                transport,
                out,
                federation=federation,
                device_id="dev-1",
                model=model,
                task=task,
                strategy=strategy,
                runtime=runtime,
                idle_timeout=10,
                attempts=1,
            )
    finally:
        transport.close()
    assert not out.exists(), "nothing is written for a refused request"
    return caught.value


def test_requests_the_hub_cannot_serve_get_a_typed_refusal(amqtt_broker: ManagedBroker, tmp_path: Path) -> None:
    text = load_model_spec("minilm-l6-v2")
    service = ArtifactService(text, "sst2", tmp_path / "cache", strategies=("lora", "full_q8"))
    image = ArtifactService(load_model_spec("efficientnet-lite0"), "digits", tmp_path / "cache2", strategies=("head",))
    state = {"w": np.zeros(2, np.float32)}
    out = tmp_path / "out"
    with (
        running_hub(amqtt_broker, tmp_path / "a", state, federation="text", artifacts=service),
        running_hub(amqtt_broker, tmp_path / "b", state, federation="image", artifacts=image),
        running_hub(amqtt_broker, tmp_path / "c", state, federation="plain"),
    ):
        full_q8 = _ask(amqtt_broker, out, "text", strategy="full_q8")
        assert full_q8.reason == "unsupported" and "not full_q8" in full_q8.detail
        assert "cannot serve ORT artifacts: unsupported" in str(full_q8)
        assert _ask(amqtt_broker, out, "text", strategy="prompt").reason == "unknown_strategy"
        assert _ask(amqtt_broker, out, "text", model="smollm2-135m").reason == "unknown_model"
        assert _ask(amqtt_broker, out, "text", task="mrpc").reason == "unknown_task"
        assert _ask(amqtt_broker, out, "text", runtime="tflite").reason == "unknown_runtime"
        vision = _ask(amqtt_broker, out, "image", model="efficientnet-lite0", task="digits", strategy="prompt")
        assert vision.reason == "unknown_strategy"  # image models are served (tests/test_ort_vision.py)
        disabled = _ask(amqtt_broker, out, "plain")
        assert disabled.reason == "disabled" and "--ort-artifacts" in disabled.detail
    assert service.builds == image.builds == 0 and not (tmp_path / "cache").exists()


# -- damaged transfers, from a scripted hub on a real broker -----------------------------------------------
def _tiny_artifacts(folder: Path) -> Path:
    """A small artifact folder with a valid manifest (the files need not be real graphs to test transport)."""
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "training_model.onnx").write_bytes(bytes(range(256)) * 40)
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = ArtifactManifest(
        spec="minilm-l6-v2", strategy="lora", strategy_config={}, task="sst2", num_labels=2,
        tensors=(TensorInfo("w", (2,)),), inputs=("input_ids",), max_length=32, opset=14, dropout=False,
        optimizer={}, training={}, tokenizer={"folder": "tokenizer"}, global_version=5, versions={}, files=files,
    )  # fmt: skip
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return folder


def _frame(archive: bytes, files: int = 3, **overrides: object) -> bytes:
    meta = {
        "federation": FED, "model": "minilm-l6-v2", "task": "sst2", "strategy": "lora", "runtime": "ort",
        "global_version": 5, "archive": "tar", "files": files, "created_at": 1.0,
    } | overrides  # fmt: skip
    return encode_artifacts(ArtifactMeta(**meta), archive)  # type: ignore[arg-type]


class ScriptedHub:
    """Answers each ArtifactRequest with the chunk frames ``respond(attempt, transfer_id)`` returns."""

    def __init__(self, broker: ManagedBroker, respond: Callable[[int, str], list[bytes]]) -> None:
        self.requests: list[ArtifactRequest] = []
        self.topics = Topics(FED)
        self.respond = respond
        self.transport: Transport = _transport(broker, "scripted-hub")
        self.transport.subscribe(f"{self.topics.base}/up/+/ctl", self._on_request)
        self.transport.connect()

    def _on_request(self, _topic: str, payload: bytes) -> None:
        request = decode_message(payload)
        assert isinstance(request, ArtifactRequest)
        self.requests.append(request)
        for chunk in self.respond(len(self.requests), request.transfer_id):
            self.transport.publish(self.topics.downlink_artifacts(request.device), chunk)  # queued: a handler


def _fetch(broker: ManagedBroker, out: Path, **kwargs: object) -> object:
    transport = _transport(broker, "fetcher")
    try:
        return fetch_artifacts(
            transport, out, federation=FED, device_id="dev-1", model="minilm-l6-v2", task="sst2", strategy="lora",
            **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        transport.close()


@pytest.fixture
def good_frame(tmp_path: Path) -> bytes:
    archive, files = pack_folder(_tiny_artifacts(tmp_path / "built"))
    return _frame(archive, files)


def test_lost_chunks_time_out_with_a_clear_error_and_a_retry_recovers(
    amqtt_broker: ManagedBroker, tmp_path: Path, good_frame: bytes
) -> None:
    def drop_chunk_1(attempt: int, transfer_id: str) -> list[bytes]:
        chunks = split_frame(good_frame, chunk_size=4096, transfer_id=transfer_id)
        return [c for i, c in enumerate(chunks) if i != 1] if attempt <= 2 else chunks

    hub = ScriptedHub(amqtt_broker, drop_chunk_1)
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"after 2 attempt\(s\): no progress for 1s: 1 chunk\(s\) never"):
            _fetch(amqtt_broker, tmp_path / "out", idle_timeout=1.0, attempts=2)
        assert time.monotonic() - started < 10, "bounded by the idle timeout, never a hang"
        assert len(hub.requests) == 2 and hub.requests[0].transfer_id != hub.requests[1].transfer_id
        assert not (tmp_path / "out").exists()
        manifest = _fetch(amqtt_broker, tmp_path / "out", idle_timeout=5.0, attempts=1)  # third request: whole
        assert isinstance(manifest, ArtifactManifest) and manifest.global_version == 5
        load_manifest(tmp_path / "out", verify=True)
    finally:
        hub.transport.close()


def test_a_request_sent_before_the_hub_listens_is_repeated(
    amqtt_broker: ManagedBroker, tmp_path: Path, good_frame: bytes
) -> None:
    """No broker keeps the first request for a hub that has not subscribed yet: the device asks again."""
    result: list[object] = []
    fetcher = threading.Thread(
        target=lambda: result.append(_fetch(amqtt_broker, tmp_path / "out", idle_timeout=10.0, ask_interval=0.3))
    )
    fetcher.start()
    time.sleep(1.0)  # the device has asked at least once, into the void
    hub = ScriptedHub(amqtt_broker, lambda _a, tid: split_frame(good_frame, chunk_size=4096, transfer_id=tid))
    try:
        fetcher.join(timeout=20)
        assert result and isinstance(result[0], ArtifactManifest), "fetched in its first attempt"
        assert len({r.transfer_id for r in hub.requests}) == 1, "repeats of one request, not new attempts"
    finally:
        hub.transport.close()


def test_a_hub_that_never_answers_times_out(amqtt_broker: ManagedBroker, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"no progress for 1s: no chunk arrived"):
        _fetch(amqtt_broker, tmp_path / "out", idle_timeout=1.0, attempts=1)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupted_or_truncated_transfer_is_detected(
    amqtt_broker: ManagedBroker, tmp_path: Path, good_frame: bytes, damage: str
) -> None:
    bad = bytearray(good_frame)
    if damage == "flipped":
        bad[-3000] ^= 0x01  # inside the archive: the chunks are cut from these bytes, so only the envelope knows
    else:
        del bad[-1000:]
    hub = ScriptedHub(amqtt_broker, lambda _a, tid: split_frame(bytes(bad), chunk_size=4096, transfer_id=tid))
    try:
        expected = "payload sha256 does not match" if damage == "flipped" else "payload has .* bytes, header declares"
        with pytest.raises(TransportError, match=f"did not verify: {expected}"):
            _fetch(amqtt_broker, tmp_path / "out", idle_timeout=5.0, attempts=2)
        assert len(hub.requests) == 2, "a damaged transfer is asked for again"
        assert not (tmp_path / "out").exists()
    finally:
        hub.transport.close()


def test_a_file_that_does_not_match_the_manifest_is_refused(amqtt_broker: ManagedBroker, tmp_path: Path) -> None:
    folder = _tiny_artifacts(tmp_path / "built")
    (folder / "training_model.onnx").write_bytes(b"not what the manifest hashed")
    archive, files = pack_folder(folder)
    frame = _frame(archive, files)
    hub = ScriptedHub(amqtt_broker, lambda _a, tid: split_frame(frame, chunk_size=4096, transfer_id=tid))
    try:
        with pytest.raises(OrtArtifactError, match="does not match its sha256"):
            _fetch(amqtt_broker, tmp_path / "out", idle_timeout=5.0)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.fetch-*"))
    finally:
        hub.transport.close()


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "error"),
    [
        (_member("../escaped.txt"), "unsafe name"),
        (_member("tokenizer/../../escaped.txt"), "unsafe name"),
        (_member("/tmp/escaped.txt"), "unsafe name"),
        (_member("C:/escaped.txt"), "unsafe name"),
        (_member("link", tarfile.SYMTYPE, "../escaped.txt"), "non-file member"),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), "non-file member"),
        (_member("fifo", tarfile.FIFOTYPE), "non-file member"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink", "hardlink", "fifo"],
)
def test_unsafe_archive_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, error: str) -> None:
    archive = _tar([(_member("ffm-ort.json"), b"{}"), (member, b"payload")])
    dest = tmp_path / "a" / "b"
    with pytest.raises(OrtArtifactError, match=error):
        unpack_archive(archive, dest)
    assert not (tmp_path / "a" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_an_unsafe_archive_from_the_hub_never_leaves_the_staging_folder(
    amqtt_broker: ManagedBroker, tmp_path: Path
) -> None:
    frame = _frame(_tar([(_member("ffm-ort.json"), b"{}"), (_member("../../escaped.txt"), b"x")]), files=2)
    hub = ScriptedHub(amqtt_broker, lambda _a, tid: split_frame(frame, chunk_size=4096, transfer_id=tid))
    try:
        with pytest.raises(OrtArtifactError, match="unsafe name"):
            _fetch(amqtt_broker, tmp_path / "dev" / "out", idle_timeout=5.0)
        assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dev" / "escaped.txt").exists()
        assert not (tmp_path / "dev" / "out").exists()
    finally:
        hub.transport.close()


def test_packing_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    folder = _tiny_artifacts(tmp_path / "built")
    first, files = pack_folder(folder)
    (folder / "training_model.onnx").touch()  # a new mtime changes nothing
    assert pack_folder(folder) == (first, files) and files == 3
    names = unpack_archive(first, tmp_path / "copy")
    assert sorted(names) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert load_manifest(tmp_path / "copy", verify=True).files == load_manifest(folder).files


# -- the command line: ffm-edge ort-fetch, and run --runtime ort fetching into the state dir ----------------
@pytest.mark.slow
@pytest.mark.mosquitto
def test_the_cli_fetches_into_the_state_dir_once(
    mosquitto_broker: ManagedBroker,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_ort()
    from ffm_edge.cli import _artifacts_for_run, build_parser, main

    cache = tmp_path_factory.getbasetemp() / "ort-serving-cache"  # shared with the test above: no second build
    service = ArtifactService(short_spec(), "sst2", cache, strategies=("lora",))
    with running_hub(mosquitto_broker, tmp_path / "hub", _hub_initial_state(), artifacts=service):
        out = tmp_path / "fetched"
        code = main(["ort-fetch", "--broker", mosquitto_broker.url, "--federation", FED, "--out", str(out)])
        assert code == 0 and "global version 0" in capsys.readouterr().out
        load_manifest(out, verify=True)

        run = ["run", "--runtime", "ort", "--broker", mosquitto_broker.url, "--federation", FED,
               "--state-dir", str(tmp_path / "edge")]  # fmt: skip
        args = build_parser().parse_args(run)
        folder = _artifacts_for_run(args, "edge-0")
        assert folder == str(tmp_path / "edge" / "ort-artifacts" / "lora") and service.transfers == 2
        assert _artifacts_for_run(args, "edge-0") == folder and service.transfers == 2, "verified, reused"
        (Path(folder) / "training_model.onnx").write_bytes(b"damaged")
        assert _artifacts_for_run(args, "edge-0") == folder and service.transfers == 3, "damaged: fetched again"
        load_manifest(folder, verify=True)
        given = build_parser().parse_args([*run, "--ort-artifacts", str(out)])
        assert _artifacts_for_run(given, "edge-0") == str(out) and service.transfers == 3, "a full folder is used"
        refused = build_parser().parse_args([*run[:-2], "--state-dir", str(tmp_path / "e2"), "--strategy", "prompt"])
        with pytest.raises(ArtifactRejectedError, match="unknown_strategy"):
            _artifacts_for_run(refused, "edge-1")


@pytest.mark.slow
def test_a_failed_build_is_reported_to_every_waiting_device_and_tried_again(
    amqtt_broker: ManagedBroker, tmp_path: Path
) -> None:
    """A model whose checkpoint folder is empty cannot be exported: the device hears that the build started,
    then the typed failure; nothing is cached, so the next request builds again."""
    require_ort()
    import dataclasses

    (tmp_path / "empty-checkpoint").mkdir()
    broken = dataclasses.replace(
        short_spec(), checkpoint_path=str(tmp_path / "empty-checkpoint"), checkpoint_package=None, hub_id=None
    )
    service = ArtifactService(broken, "sst2", tmp_path / "cache", strategies=("lora",))
    stages: list[str] = []
    with running_hub(amqtt_broker, tmp_path / "hub", {"w": np.zeros(2, np.float32)}, artifacts=service):
        for _ in range(2):
            transport = _transport(amqtt_broker, "device")
            try:
                with pytest.raises(ArtifactRejectedError) as caught:
                    fetch_artifacts(
                        transport, tmp_path / "out", federation=FED, device_id="dev-1", model="minilm-l6-v2",
                        task="sst2", strategy="lora", idle_timeout=30, build_timeout=60, attempts=1,
                        on_progress=lambda p: stages.append(p.stage),
                    )  # fmt: skip
            finally:
                transport.close()
            assert caught.value.reason == "build_failed" and caught.value.detail
    assert "building" in stages, "the device was told a build started, so it waited for it"
    assert service.builds == 0 and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "nothing cached"


def test_serving_is_off_by_default_and_switched_on_by_flag_or_config(tmp_path: Path) -> None:
    from ffm_hub.cli import build_parser as hub_parser
    from ffm_hub.config import load_hub_config
    from ffm_hub.service import ServeOptions

    assert ServeOptions().ort_artifacts is False
    assert hub_parser().parse_args(["serve"]).ort_artifacts is False
    assert hub_parser().parse_args(["serve", "--ort-artifacts"]).ort_artifacts is True
    path = tmp_path / "hub.toml"
    path.write_text("[ort]\nserve_artifacts = true\n")
    assert load_hub_config(path).options.ort_artifacts is True
    path.write_text('[ort]\nserve_artifacts = "yes"\n')
    with pytest.raises(ConfigError, match=r"ort\.serve_artifacts: must be true or false"):
        load_hub_config(path)
