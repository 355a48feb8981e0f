"""A torch-free device fetches its ORT training artifacts from a hub behind a secured broker.

The broker is a real Mosquitto (password, TLS, client certificates) or amqtt (password, TLS) with the
per-device ACL that ``ffm-hub broker-config`` writes; the hub is a real :class:`~ffm_hub.hub.Hub` whose
:class:`~ffm_hub.artifacts.ArtifactService` "builds" a small artifact folder with a valid manifest (the
transport and the ACL are under test here, not the ONNX export). A device logged in as itself gets
verified artifacts on its own downlink; without its login the fetch fails at once with a clear error; no
other device reads the transfer; and ``ffm-edge ort-fetch`` / ``run --runtime ort`` take the login flags.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import Inbox, require_mosquitto

from ffm_edge.errors import AuthError, TransportError
from ffm_edge.ort.fetch import fetch_artifacts_from_hub
from ffm_edge.ort.manifest import MANIFEST_NAME, ArtifactManifest, TensorInfo, file_sha256, load_manifest
from ffm_edge.spec import ModelSpec, load_model_spec
from ffm_edge.transport import MqttTransport, TlsOptions
from ffm_hub.artifacts import ArtifactService
from ffm_hub.brokers import AmqttBroker, ManagedBroker, MosquittoBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.security import BrokerSecurity, write_broker_config
from ffm_hub.store import SqliteStore

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

FED = "secfetch"
MODEL = "minilm-l6-v2"
DEVICES = ["dev-1", "dev-2"]


def _fake_build(
    spec: ModelSpec, task: str, strategy: str, out: Path, *, global_state: object, global_version: int, seed: int
) -> None:
    """ArtifactService's ``build``: a small folder whose manifest is what a real build would record."""
    (out / "tokenizer").mkdir(parents=True)
    (out / "training_model.onnx").write_bytes(bytes(range(256)) * 40)
    (out / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    files = {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = ArtifactManifest(
        spec=spec.name, strategy=strategy, strategy_config={}, task=task, num_labels=2,
        tensors=(TensorInfo("w", (2,)),), inputs=("input_ids",), max_length=32, opset=14, dropout=False,
        optimizer={}, training={}, tokenizer={"folder": "tokenizer"}, global_version=global_version, versions={},
        files=files,
    )  # fmt: skip
    (out / MANIFEST_NAME).write_text(manifest.to_json())


@dataclass(frozen=True)
class Login:
    """A user's login on the secured broker, as the fetch (and ``ffm-edge`` flags) take it."""

    username: str | None
    password: str | None
    tls: TlsOptions | None
    password_file: Path | None


def _login(security: BrokerSecurity, user: str) -> Login:
    ca = str(security.tls.ca_file) if security.tls is not None else None
    if security.client_certs:
        cert, key = security.client_cert(user)
        return Login(None, None, TlsOptions(ca, str(cert), str(key)), None)
    path = security.password_path(user)
    return Login(user, path.read_text().strip(), TlsOptions(ca) if ca is not None else None, path)


def _connect(broker: ManagedBroker, login: Login, client_id: str) -> MqttTransport:
    transport = MqttTransport(
        broker.host, broker.port, client_id, username=login.username, password=login.password, tls=login.tls or False
    )
    transport.connect(timeout=5)
    return transport


@dataclass
class SecuredHub:
    """A secured broker and a hub logged in to it that serves (small) ORT artifacts."""

    broker: ManagedBroker
    security: BrokerSecurity
    service: ArtifactService


_SETUPS = [
    pytest.param(("mosquitto", "password"), marks=pytest.mark.mosquitto, id="mosquitto-password"),
    pytest.param(("mosquitto", "tls"), marks=pytest.mark.mosquitto, id="mosquitto-tls"),
    pytest.param(("mosquitto", "certs"), marks=pytest.mark.mosquitto, id="mosquitto-client-certs"),
    pytest.param(("amqtt", "password"), id="amqtt-password"),
    pytest.param(("amqtt", "tls"), id="amqtt-tls"),
]


@contextlib.contextmanager
def _secured_hub(tmp_path: Path, kind: str, mode: str) -> Iterator[SecuredHub]:
    security = write_broker_config(
        tmp_path / "sec", FED, DEVICES, tls=mode != "password", client_certs=mode == "certs", passwd_tool=None
    )
    broker: ManagedBroker
    if kind == "mosquitto":
        broker = MosquittoBroker(workdir=tmp_path / "mosquitto", binary=require_mosquitto(), security=security)
    else:
        broker = AmqttBroker(security=security)
    service = ArtifactService(
        load_model_spec(MODEL), "sst2", tmp_path / "cache", strategies=("lora",), build=_fake_build
    )
    with broker:
        transport = _connect(broker, _login(security, security.hub_user), f"hub-{time.monotonic_ns()}")
        store = SqliteStore(tmp_path / "hub")
        hub = Hub(
            HubSettings(federation=FED, model=MODEL, tau=1),
            transport,
            store,
            initial_state=lambda: {"w": np.zeros(2, np.float32)},
            artifacts=service,
        )
        hub.start()
        try:
            yield SecuredHub(broker, security, service)
        finally:
            hub.stop()
            transport.close()
            store.close()


@pytest.fixture(params=_SETUPS)
def secured_hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecuredHub]:
    with _secured_hub(tmp_path, *request.param) as setup:
        yield setup


@pytest.fixture
def tls_hub(mosquitto_binary: str, tmp_path: Path) -> Iterator[SecuredHub]:
    with _secured_hub(tmp_path, "mosquitto", "tls") as setup:
        yield setup


def _fetch(
    setup: SecuredHub,
    out: Path,
    login: Login | None,
    *,
    device: str = "dev-1",
    idle_timeout: float = 10.0,
    ask_interval: float = 0.5,
    attempts: int = 3,
) -> ArtifactManifest:
    login = login or Login(None, None, None, None)
    return fetch_artifacts_from_hub(
        setup.broker.url, out, federation=FED, device_id=device, model=MODEL, task="sst2", strategy="lora",
        username=login.username, password=login.password, tls=login.tls, idle_timeout=idle_timeout,
        ask_interval=ask_interval, attempts=attempts,
    )  # fmt: skip


# -- the fetch itself ---------------------------------------------------------------------------------------


def test_a_device_logged_in_as_itself_fetches_verified_artifacts(secured_hub: SecuredHub, tmp_path: Path) -> None:
    """The ACL lets a device ask on its own uplink and receive on its own downlink under the ``-fetch``
    client id; another device, subscribed wherever the broker lets it, sees none of the transfer."""
    security = secured_hub.security
    spy_box = Inbox()
    spy = _connect(secured_hub.broker, _login(security, "dev-2"), "spy")
    try:
        for wanted in (f"ffm/v1/{FED}/down/dev-1/#", f"ffm/v1/{FED}/down/+/artifacts"):
            with contextlib.suppress(TransportError):  # a broker may refuse the SUBACK or just never deliver
                spy.subscribe(wanted, spy_box)
        out = tmp_path / "device" / "ort-lora"
        manifest = _fetch(secured_hub, out, _login(security, "dev-1"))
        time.sleep(0.2)
    finally:
        spy.close()
    assert (manifest.spec, manifest.strategy, manifest.task, manifest.global_version) == (MODEL, "lora", "sst2", 0)
    assert load_manifest(out, verify=True).files == manifest.files
    assert secured_hub.service.transfers == 1 and secured_hub.service.builds == 1
    assert spy_box.messages == [], "another device read the transfer"


def test_a_device_cannot_fetch_as_another_device(secured_hub: SecuredHub, tmp_path: Path) -> None:
    """Logged in as dev-1, asking as dev-2: the ACL drops the request (or the subscription), the hub sends
    nothing, and the fetch fails within its timeout."""
    started = time.monotonic()
    with pytest.raises(TransportError, match="no progress for 1s: no chunk arrived"):
        _fetch(secured_hub, tmp_path / "out", _login(secured_hub.security, "dev-1"), device="dev-2",
               idle_timeout=1.0, ask_interval=0.3, attempts=1)  # fmt: skip
    assert time.monotonic() - started < 10
    assert secured_hub.service.transfers == 0 and not (tmp_path / "out").exists()


def test_without_the_login_the_fetch_fails_at_once(secured_hub: SecuredHub, tmp_path: Path) -> None:
    """No login at all: refused by the broker (a password broker says so; a TLS broker's handshake fails
    against the system's CAs), a clear error long before the fetch's own timeouts."""
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        _fetch(secured_hub, tmp_path / "out", None, idle_timeout=30)
    assert time.monotonic() - started < 8
    if secured_hub.security.tls is None:
        assert isinstance(caught.value, AuthError) and "refused the connection" in str(caught.value)
    else:
        assert "TLS handshake" in str(caught.value)
    assert secured_hub.service.transfers == 0 and not (tmp_path / "out").exists()


@pytest.mark.mosquitto
def test_a_wrong_password_is_an_auth_error(tls_hub: SecuredHub, tmp_path: Path) -> None:
    login = _login(tls_hub.security, "dev-1")
    wrong = Login(login.username, _login(tls_hub.security, "dev-2").password, login.tls, None)
    with pytest.raises(AuthError):
        _fetch(tls_hub, tmp_path / "out", wrong, idle_timeout=30)
    assert tls_hub.service.transfers == 0


# -- the command line -------------------------------------------------------------------------------------


def test_ort_fetch_takes_the_login_flags() -> None:
    from ffm_edge.cli import _broker_login, build_parser

    args = build_parser().parse_args(["ort-fetch", "--out", "x", "--device-id", "dev-1", "--tls-ca", "ca.crt",
                                      "--tls-cert", "c.crt", "--tls-key", "c.key"])  # fmt: skip
    assert _broker_login(args, args.device_id)._asdict() == {
        "username": "dev-1",  # the device id, as for `run`
        "password": None,
        "tls": TlsOptions("ca.crt", "c.crt", "c.key"),
    }
    plain = build_parser().parse_args(["ort-fetch", "--out", "x"])
    assert _broker_login(plain, "edge-0")._asdict() == {"username": None, "password": None, "tls": None}
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = ("--username", "--password-file", "--tls-ca", "--tls-cert", "--tls-key")
    helps = {
        cmd: [(a.option_strings, a.help) for a in commands[cmd]._actions if set(a.option_strings) & set(flags)]
        for cmd in ("run", "ort-fetch")
    }
    assert helps["run"] == helps["ort-fetch"] and len(helps["run"]) == len(flags), "one set of flags on both"


@pytest.mark.mosquitto
def test_the_cli_fetches_through_the_secured_broker(
    tls_hub: SecuredHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ffm_edge.cli import _artifacts_for_run, build_parser, main

    security, url = tls_hub.security, tls_hub.broker.url
    ca = str(security.folder / "ca.crt")
    out = tmp_path / "fetched"
    base = ["ort-fetch", "--broker", url, "--federation", FED, "--device-id", "dev-1", "--out", str(out)]
    login = ["--password-file", str(security.password_path("dev-1")), "--tls-ca", ca]
    assert main([*base, "--timeout", "10", *login]) == 0
    assert "global version 0" in capsys.readouterr().out
    load_manifest(out, verify=True)
    refused = [*base[:-1], str(tmp_path / "refused"), "--tls-ca", ca]
    assert main(refused) == 2, "TLS but no password: refused, reported as an error"
    assert not (tmp_path / "refused").exists()

    run = ["run", "--runtime", "ort", "--broker", url, "--federation", FED, "--device-id", "dev-2",
           "--state-dir", str(tmp_path / "edge"), "--password-file", str(security.password_path("dev-2")),
           "--tls-ca", ca, "--fetch-timeout", "10"]  # fmt: skip
    folder = _artifacts_for_run(build_parser().parse_args(run), "dev-2")
    assert folder == str(tmp_path / "edge" / "ort-artifacts" / "lora")
    load_manifest(folder, verify=True)
    assert tls_hub.service.transfers == 2
