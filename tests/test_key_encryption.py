"""Private keys encrypted at rest: a copied key file alone signs nothing.

``keygen --passphrase-file`` (edge and hub) writes an encrypted PKCS#8 key; loading it needs the passphrase
from a file or ``$FFM_KEY_PASSPHRASE``, and every failure says which is missing or wrong. Then the keys work
as before, checked over both real brokers: a device signs with its decrypted key and the hub, holding its
own decrypted key, accepts the update and signs what it serves.
"""

from __future__ import annotations

import stat
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from wire_device import FED, STATE, Device

from ffm_edge.cli import main as edge_main
from ffm_edge.errors import ConfigError
from ffm_edge.signing import (
    PASSPHRASE_ENV,
    format_public_key,
    load_private_key,
    load_public_key,
    read_passphrase,
    sign_update_frame,
    verify_global_frame,
    write_keypair,
)
from ffm_edge.transport import MqttTransport
from ffm_edge.wire import PullRequest, Receipt, UpdateMeta, encode_update
from ffm_edge.wire.chunking import Completed
from ffm_hub.brokers import ManagedBroker
from ffm_hub.cli import main as hub_main
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.signing import HubSecurity
from ffm_hub.store import SqliteStore

SECRET = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_passphrase_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def test_an_encrypted_key_needs_its_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private, public = write_keypair(tmp_path, "phone", passphrase=SECRET)
    data = private.read_bytes()
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data and stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match=f"is encrypted: give its passphrase.*{PASSPHRASE_ENV}"):
        load_private_key(private)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_private_key(private, b"not it")
    key = load_private_key(private, SECRET)
    assert format_public_key(key) == format_public_key(load_public_key(public))
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET.decode())
    assert format_public_key(load_private_key(private)) == format_public_key(key)  # from the environment


def test_unencrypted_keys_load_as_before_and_empty_passphrases_are_refused(tmp_path: Path) -> None:
    private, _ = write_keypair(tmp_path, "plain")
    assert b"-----BEGIN PRIVATE KEY-----" in private.read_bytes()
    load_private_key(private)
    load_private_key(private, SECRET)  # a passphrase for an unencrypted key is not an error
    with pytest.raises(ConfigError, match="empty passphrase"):
        write_keypair(tmp_path, "empty", passphrase=b"")
    (tmp_path / "garbage.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private_key(tmp_path / "garbage.key")


def test_passphrase_comes_from_the_first_line_of_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pass").write_text("s3cret phrase\nignored\n", encoding="utf-8")
    assert read_passphrase(tmp_path / "pass") == b"s3cret phrase"
    assert read_passphrase(None) is None
    monkeypatch.setenv(PASSPHRASE_ENV, "from-env")
    assert read_passphrase(None) == b"from-env"
    assert read_passphrase(tmp_path / "pass") == b"s3cret phrase"  # the file wins
    (tmp_path / "empty").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        read_passphrase(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read passphrase file"):
        read_passphrase(tmp_path / "missing")


def test_keygen_commands_encrypt_with_a_passphrase_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pass").write_text(SECRET.decode() + "\n", encoding="utf-8")
    assert edge_main(["keygen", "--out", str(tmp_path / "edge"), "--name", "cam-1", "--passphrase-file",
                      str(tmp_path / "pass")]) == 0  # fmt: skip
    assert hub_main(["keygen", "--out", str(tmp_path / "hub"), "--passphrase-file", str(tmp_path / "pass")]) == 0
    assert hub_main(["keygen", "--out", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert out.count("encrypted with the passphrase") == 2 and "unencrypted: protect the file" in out
    for key in (tmp_path / "edge" / "cam-1.key", tmp_path / "hub" / "hub.key"):
        with pytest.raises(ConfigError, match="is encrypted"):
            load_private_key(key)
        load_private_key(key, SECRET)


def test_encrypted_keys_sign_and_verify_over_a_real_broker(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    device_private, device_public = write_keypair(tmp_path / "device", "d1", passphrase=SECRET)
    hub_private, hub_public = write_keypair(tmp_path / "hub", "hub", passphrase=b"another one")
    (tmp_path / "enrolled").mkdir()
    (tmp_path / "enrolled" / "d1.pub").write_bytes(device_public.read_bytes())
    security = HubSecurity.from_files(
        require_signatures=True,
        enrolled_keys=tmp_path / "enrolled",
        hub_key=hub_private,
        hub_key_passphrase=b"another one",
    )
    transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(HubSettings(federation=FED, tau=1), transport, store, initial_state=lambda: STATE, security=security)
    hub.start()
    device = Device(
        None, "d1", transport=MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"d1-{tmp_path.name}")
    )
    try:
        meta = UpdateMeta(FED, "d1", uuid.uuid4().hex, 0, "lora", 10, "fp32", time.time())
        delta = {k: np.full_like(v, 0.5) for k, v in STATE.items()}
        signed = sign_update_frame(encode_update(meta, delta), load_private_key(device_private, SECRET))
        device.send_frame(signed, meta.update_id)
        receipt = device.next(Receipt, timeout=30)
        assert isinstance(receipt, Receipt) and receipt.update_id == meta.update_id
        assert hub.wait_for_version(1, timeout=30)
        device.control(PullRequest("d1", -1, "pull-signed"))
        done = device.next(Completed, timeout=30)
        assert isinstance(done, Completed)
        verify_global_frame(done.data, load_public_key(hub_public))  # signed with the decrypted hub key
    finally:
        device.transport.close()
        hub.stop()
        transport.close()
        store.close()


def test_edge_run_loads_an_encrypted_device_key_with_its_passphrase_file(tmp_path: Path) -> None:
    from ffm_edge.cli import _device_key, build_parser

    private, public = write_keypair(tmp_path, "d1", passphrase=SECRET)
    (tmp_path / "pass").write_text(SECRET.decode(), encoding="utf-8")
    args = build_parser().parse_args(
        ["run", "--device-key", str(private), "--key-passphrase-file", str(tmp_path / "pass")]
    )
    key = _device_key(args)
    assert key is not None and format_public_key(key) == format_public_key(load_public_key(public))
    with pytest.raises(ConfigError, match="is encrypted"):
        _device_key(build_parser().parse_args(["run", "--device-key", str(private)]))
