"""Broker security: the files `ffm-hub broker-config` writes, enforced by a real Mosquitto (and by amqtt as
far as it can): no anonymous or wrong-password logins, per-device ACLs counted on what the receivers get
(never on PUBACKs, which a broker sends for denied publishes too), and TLS with the generated CA."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Inbox

from ffm_edge.errors import AuthError, ConfigError, TransportError
from ffm_edge.transport.mqtt import MqttTransport, TlsOptions
from ffm_hub.brokers import AmqttBroker, ManagedBroker, MosquittoBroker, free_port
from ffm_hub.cli import main as hub_main
from ffm_hub.security import (
    BrokerSecurity,
    load_broker_security,
    mosquitto_password_hash,
    write_broker_config,
)
from ffm_hub.service import ServeOptions, _broker_login

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

FED = "F"
ROOT = f"ffm/v1/{FED}"


@pytest.fixture(scope="module")
def plain_security(tmp_path_factory: pytest.TempPathFactory) -> BrokerSecurity:
    return write_broker_config(tmp_path_factory.mktemp("sec-plain"), FED, ["d1", "d2"])


@pytest.fixture(scope="module")
def tls_security(tmp_path_factory: pytest.TempPathFactory) -> BrokerSecurity:
    return write_broker_config(tmp_path_factory.mktemp("sec-tls"), FED, ["d1", "d2"], tls=True)


def _password(security: BrokerSecurity, user: str) -> str:
    return security.password_path(user).read_text().strip()


@contextlib.contextmanager
def _client(
    broker: ManagedBroker,
    user: str | None,
    password: str | None,
    tls: TlsOptions | None = None,
    timeout: float = 5.0,
) -> Iterator[MqttTransport]:
    transport = MqttTransport(broker.host, broker.port, "", username=user, password=password, tls=tls or False)
    try:
        transport.connect(timeout=timeout)
        yield transport
    finally:
        transport.close()


def _login(
    broker: ManagedBroker, security: BrokerSecurity, user: str
) -> contextlib.AbstractContextManager[MqttTransport]:
    tls = TlsOptions(str(security.tls.ca_file)) if security.tls is not None else None
    return _client(broker, user, _password(security, user), tls)


@pytest.fixture
def secure_mosquitto(
    mosquitto_binary: str, tmp_path: Path, plain_security: BrokerSecurity
) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(workdir=tmp_path / "m", binary=mosquitto_binary, security=plain_security) as broker:
        yield broker


@pytest.fixture
def secure_amqtt(plain_security: BrokerSecurity) -> Iterator[AmqttBroker]:
    with AmqttBroker(security=plain_security) as broker:
        yield broker


@pytest.fixture(params=[pytest.param("mosquitto", marks=pytest.mark.mosquitto), "amqtt"])
def secure_broker(request: pytest.FixtureRequest) -> ManagedBroker:
    broker: ManagedBroker = request.getfixturevalue(f"secure_{request.param}")
    return broker


# -- the generated files -------------------------------------------------------------------------------------


def test_broker_config_writes_a_deployment(tmp_path: Path) -> None:
    out = tmp_path / "dep"
    assert hub_main(["broker-config", "--out", str(out), "--federation", FED, "--devices", "d1,d2", "--tls"]) == 0
    security = load_broker_security(out)
    assert security.devices == ("d1", "d2") and security.hub_user == "hub" and security.tls is not None
    conf = (out / "mosquitto.conf").read_text()
    for line in ("listener 8883 0.0.0.0", "allow_anonymous false", f"password_file {out.resolve()}/passwd"):
        assert line in conf.splitlines()
    acl = (out / "acl").read_text().splitlines()
    assert f"pattern write {ROOT}/up/%u/#" in acl and f"pattern read {ROOT}/down/%u/#" in acl
    for secret in ("credentials.txt", "passwords/d1", "passwd", "ca.key", "server.key"):
        assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600, secret
    users = [line.split(":")[0] for line in (out / "credentials.txt").read_text().splitlines()]
    assert users == ["hub", "d1", "d2"]
    assert not any(":" not in line or "$7$" not in line for line in (out / "passwd").read_text().splitlines())


@pytest.mark.parametrize("devices", [["d/1"], ["d+"], ["hub"], ["d1", "d1"], []])
def test_broker_config_rejects_bad_device_ids(tmp_path: Path, devices: list[str]) -> None:
    with pytest.raises(ConfigError):
        write_broker_config(tmp_path, FED, devices)


@pytest.mark.mosquitto
@pytest.mark.parametrize("tool", ["auto", None], ids=["mosquitto_passwd", "python-pbkdf2"])
def test_generated_mosquitto_conf_runs_in_the_real_binary(mosquitto_binary: str, tool: str | None) -> None:
    """The exact mosquitto.conf, as an operator would run it (as root mosquitto drops to its own user)."""
    folder = Path(tempfile.mkdtemp(prefix="ffm-sec-"))
    folder.chmod(0o755)  # an operator's /etc/mosquitto is traversable by the mosquitto user
    port = free_port()
    proc = None
    try:
        security = write_broker_config(folder, FED, ["d1"], port=port, bind="127.0.0.1", passwd_tool=tool)
        assert (folder / "passwd").read_text().count("$7$101$") == 2
        proc = subprocess.Popen(
            [mosquitto_binary, "-c", str(folder / "mosquitto.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        broker = _Address(port)
        deadline = time.monotonic() + 5
        while True:
            try:
                with _login(broker, security, "d1") as d1:
                    assert d1.connected
                break
            except TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with pytest.raises(AuthError):
            with _client(broker, "d1", "wrong"):
                pass
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


class _Address(MosquittoBroker):
    """Host and port of a broker this test started by hand."""

    def __init__(self, port: int) -> None:
        super().__init__(port=port)


def test_python_hash_is_mosquittos_pbkdf2_format() -> None:
    value = mosquitto_password_hash("secret", salt=b"0123456789ab")
    assert value.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and len(value.split("$")[-1]) == 88


# -- authentication and ACLs, on both brokers --------------------------------------------------------------


def test_anonymous_and_wrong_password_are_refused(secure_broker: ManagedBroker, plain_security: BrokerSecurity) -> None:
    with pytest.raises(AuthError):
        with _client(secure_broker, None, None):
            pass
    with pytest.raises(AuthError):
        with _client(secure_broker, "d1", "not-the-password"):
            pass
    with pytest.raises(AuthError):
        with _client(secure_broker, "d1", _password(plain_security, "d2")):
            pass


def test_device_writes_only_its_own_uplink(secure_broker: ManagedBroker, plain_security: BrokerSecurity) -> None:
    received = Inbox()
    with _login(secure_broker, plain_security, "hub") as hub, _login(secure_broker, plain_security, "d1") as d1:
        hub.subscribe(f"{ROOT}/up/+/update", received)
        hub.subscribe(f"{ROOT}/presence/+", received)
        d1.publish(f"{ROOT}/up/d1/update", b"own")
        d1.publish(f"{ROOT}/up/d2/update", b"forged")  # acknowledged, but must not be delivered
        d1.publish(f"{ROOT}/presence/d2", b"forged")
        d1.publish(f"{ROOT}/up/d1/update", b"marker")  # same connection, QoS 1: arrives after the forgeries
        received.wait_for_payload(f"{ROOT}/up/d1/update", b"marker")
        time.sleep(0.2)
        assert received.messages == [(f"{ROOT}/up/d1/update", b"own"), (f"{ROOT}/up/d1/update", b"marker")]


def test_device_reads_only_its_own_downlink(secure_broker: ManagedBroker, plain_security: BrokerSecurity) -> None:
    d1_box, d2_box = Inbox(), Inbox()
    with (
        _login(secure_broker, plain_security, "hub") as hub,
        _login(secure_broker, plain_security, "d1") as d1,
        _login(secure_broker, plain_security, "d2") as d2,
    ):
        with contextlib.suppress(TransportError):  # a broker may refuse the SUBACK or just never deliver
            d1.subscribe(f"{ROOT}/down/d2/ctl", d1_box)
        with contextlib.suppress(TransportError):
            d1.subscribe(f"{ROOT}/down/+/ctl", d1_box)
        d1.subscribe(f"{ROOT}/global/manifest", d1_box)
        d2.subscribe(f"{ROOT}/down/d2/ctl", d2_box)
        hub.publish(f"{ROOT}/down/d2/ctl", b"for-d2")
        hub.publish(f"{ROOT}/global/manifest", b"manifest")
        d2_box.wait_for_payload(f"{ROOT}/down/d2/ctl", b"for-d2")
        d1_box.wait_for_payload(f"{ROOT}/global/manifest", b"manifest")
        time.sleep(0.2)
        assert d1_box.messages == [(f"{ROOT}/global/manifest", b"manifest")]
        assert d2_box.messages == [(f"{ROOT}/down/d2/ctl", b"for-d2")]


def test_device_cannot_publish_downlinks_or_the_manifest(
    secure_broker: ManagedBroker, plain_security: BrokerSecurity
) -> None:
    d2_box = Inbox()
    with _login(secure_broker, plain_security, "d1") as d1, _login(secure_broker, plain_security, "d2") as d2:
        d2.subscribe(f"{ROOT}/down/d2/#", d2_box)
        d2.subscribe(f"{ROOT}/global/manifest", d2_box)
        d1.publish(f"{ROOT}/down/d2/ctl", b"forged receipt")
        d1.publish(f"{ROOT}/global/manifest", b"forged manifest")
        d1.publish(f"{ROOT}/up/d1/update", b"sync")  # a round trip on d1's connection after the forgeries
        time.sleep(0.3)
        assert d2_box.messages == []


# -- TLS ------------------------------------------------------------------------------------------------------


@pytest.mark.mosquitto
def test_tls_with_the_generated_ca(mosquitto_binary: str, tmp_path: Path, tls_security: BrokerSecurity) -> None:
    with MosquittoBroker(workdir=tmp_path / "m", binary=mosquitto_binary, security=tls_security) as broker:
        assert broker.url.startswith("mqtts://")
        received = Inbox()
        with _login(broker, tls_security, "hub") as hub, _login(broker, tls_security, "d1") as d1:
            hub.subscribe(f"{ROOT}/up/+/update", received)
            d1.publish(f"{ROOT}/up/d1/update", b"over tls")
            received.wait_for_payload(f"{ROOT}/up/d1/update", b"over tls")
        # Plain MQTT to the TLS listener never completes the handshake: a bounded error, not a hang.
        with pytest.raises(TransportError):
            with _client(broker, "d1", _password(tls_security, "d1"), timeout=2.0):
                pass
        # The system's CAs do not know the generated CA: refused at once, not retried.
        started = time.monotonic()
        with pytest.raises(TransportError, match="TLS handshake"):
            with _client(broker, "d1", _password(tls_security, "d1"), tls=TlsOptions()):
                pass
        assert time.monotonic() - started < 2.0


@pytest.mark.mosquitto
def test_client_certificates_name_the_device(mosquitto_binary: str, tmp_path: Path) -> None:
    security = write_broker_config(tmp_path / "sec", FED, ["d1"], client_certs=True)
    ca = str(security.tls.ca_file) if security.tls is not None else None
    received = Inbox()
    with MosquittoBroker(workdir=tmp_path / "m", binary=mosquitto_binary, security=security) as broker:
        hub_cert, hub_key = security.client_cert("hub")
        d1_cert, d1_key = security.client_cert("d1")
        with (
            _client(broker, None, None, TlsOptions(ca, str(hub_cert), str(hub_key))) as hub,
            _client(broker, None, None, TlsOptions(ca, str(d1_cert), str(d1_key))) as d1,
        ):
            hub.subscribe(f"{ROOT}/up/+/update", received)
            d1.publish(f"{ROOT}/up/d2/update", b"forged")
            d1.publish(f"{ROOT}/up/d1/update", b"by cert")
            received.wait_for_payload(f"{ROOT}/up/d1/update", b"by cert")
            assert received.messages == [(f"{ROOT}/up/d1/update", b"by cert")]
        with pytest.raises(TransportError):  # no certificate: the TLS handshake is refused
            with _client(broker, "d1", None, TlsOptions(ca), timeout=2.0):
                pass


def test_amqtt_cannot_require_client_certificates(tmp_path: Path) -> None:
    security = write_broker_config(tmp_path / "sec", FED, ["d1"], client_certs=True)
    with pytest.raises(ConfigError, match="amqtt cannot require client certificates"):
        AmqttBroker(security=security)


def test_amqtt_serves_tls_with_the_generated_ca(tls_security: BrokerSecurity) -> None:
    received = Inbox()
    with AmqttBroker(security=tls_security) as broker:
        assert broker.url.startswith("mqtts://")
        with _login(broker, tls_security, "hub") as hub, _login(broker, tls_security, "d1") as d1:
            hub.subscribe(f"{ROOT}/up/+/update", received)
            d1.publish(f"{ROOT}/up/d1/update", b"over tls")
            received.wait_for_payload(f"{ROOT}/up/d1/update", b"over tls")


# -- the hub's own login ---------------------------------------------------------------------------------------


def test_hub_logs_in_as_the_hub_user(tls_security: BrokerSecurity, tmp_path: Path) -> None:
    login = _broker_login(ServeOptions(federation=FED, secure=tls_security.folder, state_dir=tmp_path))
    assert login.username == "hub" and login.password == _password(tls_security, "hub")
    assert login.tls is not None and login.tls.ca_file == str(tls_security.tls.ca_file)  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="federation"):
        _broker_login(ServeOptions(federation="other", secure=tls_security.folder, state_dir=tmp_path))
    assert _broker_login(ServeOptions(state_dir=tmp_path)).username is None  # security stays off by default


def test_password_file_is_private_from_the_start(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        security = write_broker_config(tmp_path / "sec", FED, ["d1"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(security.credentials_file.stat().st_mode) == 0o600


def test_toml_security_table(tls_security: BrokerSecurity, tmp_path: Path) -> None:
    from ffm_hub.config import load_hub_config

    path = tmp_path / "hub.toml"
    path.write_text(f'[federation]\nname = "{FED}"\n\n[security]\ndir = "{tls_security.folder}"\n')
    opts = load_hub_config(path).options
    assert opts.secure == tls_security.folder
    assert _broker_login(opts).username == "hub"


@pytest.mark.slow  # EfficientNet-Lite0 twice (hub and edge), a few seconds
@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=pytest.mark.mosquitto), "amqtt"])
def test_a_round_through_the_secured_managed_broker(tmp_path: Path, kind: str) -> None:
    """The whole protocol fits the ACL: hello, pull, upload, receipt and the new version, over TLS."""
    from ffm_edge.client import EdgeClient
    from ffm_edge.data import load_split
    from ffm_edge.spec import load_model_spec
    from ffm_hub.service import running_hub

    if kind == "mosquitto":
        from conftest import require_mosquitto

        require_mosquitto()
    security = write_broker_config(tmp_path / "sec", "svc", ["cam-1"], tls=True)
    opts = ServeOptions(
        federation="svc",
        model="efficientnet-lite0",
        task="digits",
        strategy="head",
        tau=1,
        eval_limit=16,
        state_dir=tmp_path / "hub",
        broker_kind=kind,
        broker_port=0,
        secure=security.folder,
        advertise=False,
    )
    data = load_split("digits", "train", limit=64, seed=5).subset(range(32))
    with running_hub(opts) as hub:
        url = (tmp_path / "hub" / "broker.url").read_text().strip()
        assert url.startswith("mqtts://")
        edge = EdgeClient(
            load_model_spec("efficientnet-lite0"),
            data,
            device_id="cam-1",
            federation="svc",
            strategy="head",
            broker=url,
            broker_username="cam-1",
            broker_password=_password(security, "cam-1"),
            broker_tls=TlsOptions(str(security.folder / "ca.crt")),
            state_dir=tmp_path / "edge",
        )
        with edge:
            results = edge.run_forever(rounds=1)
        assert hub.wait_idle()
        versions = hub.store.versions()
    assert [r.base_version for r in results] == [0] and len(versions) == 2


def test_edge_run_flags_become_the_broker_login(plain_security: BrokerSecurity) -> None:
    from ffm_edge.cli import _broker_login as edge_login
    from ffm_edge.cli import build_parser

    pw_file = str(plain_security.password_path("d1"))
    args = build_parser().parse_args(["run", "--password-file", pw_file, "--tls-ca", "ca.crt"])
    login = edge_login(args, "d1")
    assert login.username == "d1" and login.password == _password(plain_security, "d1")
    assert login.tls == TlsOptions("ca.crt")
    assert edge_login(build_parser().parse_args(["run"]), "d1")._asdict() == {
        "username": None,
        "password": None,
        "tls": None,
    }
