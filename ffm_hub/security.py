"""Broker security for a deployment: credentials, per-device topic ACLs, TLS files, and the configs
that make Mosquitto (and, as far as it can, amqtt) enforce them.

:func:`write_broker_config` writes one folder that ``ffm-hub broker-config`` hands to an operator and
``ffm-hub serve --secure DIR`` hands to the managed broker; :func:`load_broker_security` reads it back
from its ``security.json``. The ACL is the one in DESIGN.md: a device (username = device id) writes only
its own uplink and presence, and reads only its own downlink and the global topics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffm_edge.errors import ConfigError

__all__ = [
    "SECURITY_FILE",
    "BrokerSecurity",
    "TlsFiles",
    "amqtt_acls",
    "amqtt_password_hash",
    "find_mosquitto_passwd",
    "load_broker_security",
    "mosquitto_acl",
    "mosquitto_password_hash",
    "mosquitto_security_lines",
    "write_broker_config",
]

SECURITY_FILE = "security.json"
_PASSWD_PATHS = ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # no MQTT wildcards, no '/', no ':' (password file separator)
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for $7$ (PBKDF2-SHA512)


@dataclass(frozen=True)
class TlsFiles:
    """The CA that signed the broker's certificate, and the broker's certificate and key (PEM)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class BrokerSecurity:
    """What a secured broker enforces; the files live in ``folder`` (see :func:`write_broker_config`)."""

    folder: Path
    federation: str
    devices: tuple[str, ...]
    hub_user: str
    tls: TlsFiles | None = None
    client_certs: bool = False  # clients authenticate with a certificate whose CN is the username

    @property
    def password_file(self) -> Path:
        """Mosquitto's password file (PBKDF2-SHA512 hashes)."""
        return self.folder / "passwd"

    @property
    def amqtt_password_file(self) -> Path:
        """The same users for amqtt's FileAuthPlugin (argon2 hashes, which amqtt 0.12 verifies)."""
        return self.folder / "amqtt_passwd"

    @property
    def acl_file(self) -> Path:
        """Mosquitto's ACL file (``pattern`` lines)."""
        return self.folder / "acl"

    @property
    def credentials_file(self) -> Path:
        """``user:password`` lines in clear, 0600, for distribution to the devices and the hub."""
        return self.folder / "credentials.txt"

    def password_path(self, user: str) -> Path:
        """A file holding only ``user``'s password (for ``--password-file``)."""
        return self.folder / "passwords" / user

    def client_cert(self, user: str) -> tuple[Path, Path]:
        """``user``'s client certificate and key (client-certificate mode)."""
        return self.folder / "clients" / f"{user}.crt", self.folder / "clients" / f"{user}.key"


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"invalid {kind} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def mosquitto_acl(federation: str, hub_user: str) -> str:
    """Mosquitto ACL file: the hub's own rules, then ``pattern`` rules that apply to every device (%u)."""
    root = f"ffm/v1/{_check_name('federation', federation)}"
    return "\n".join(
        [
            "# written by ffm-hub broker-config: a device writes only its uplink and presence,",
            "# and reads only its downlink and the global topics; the hub the other way round.",
            f"user {hub_user}",
            f"topic read {root}/up/#",
            f"topic read {root}/presence/#",
            f"topic readwrite {root}/hub/#",
            f"topic write {root}/down/#",
            f"topic readwrite {root}/global/#",
            "",
            "# every other user: its username is its device id",
            f"pattern write {root}/up/%u/#",
            f"pattern write {root}/presence/%u",
            f"pattern read {root}/down/%u/#",
            f"pattern read {root}/global/#",
            f"pattern read {root}/hub/presence",
            "",
        ]
    )


def amqtt_acls(
    federation: str, devices: Sequence[str], hub_user: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(subscribe ACL, publish ACL) per username for amqtt's TopicAccessControlListPlugin.

    amqtt has no ``%u`` patterns, so each known device gets its own lists; a device added later needs a
    regenerated config. Its subscribe check compares filters level by level, so ``+``/``#`` in a device's
    filter only match where the allowed filter has the same wildcard (never wider than allowed).
    """
    root = f"ffm/v1/{federation}"
    subscribe = {hub_user: [f"{root}/up/#", f"{root}/presence/#", f"{root}/hub/#", f"{root}/global/#"]}
    publish = {hub_user: [f"{root}/down/#", f"{root}/global/#", f"{root}/hub/#"]}
    for device in devices:
        subscribe[device] = [f"{root}/down/{device}/#", f"{root}/global/#", f"{root}/hub/presence"]
        publish[device] = [f"{root}/up/{device}/#", f"{root}/presence/{device}"]
    return subscribe, publish


def find_mosquitto_passwd() -> str | None:
    """The ``mosquitto_passwd`` binary, if installed."""
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    return next((p for p in _PASSWD_PATHS if os.access(p, os.X_OK)), None)


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$`` hash: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, base64 fields."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _PBKDF2_ITERATIONS)
    return f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def amqtt_password_hash(password: str) -> str:
    """An argon2 hash that amqtt 0.12's FileAuthPlugin verifies (through pwdlib, which amqtt requires)."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    return Argon2Hasher().hash(password)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only (created 0600, never world-readable for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _mosquitto_passwd_file(path: Path, passwords: dict[str, str], tool: str | None) -> None:
    """Write Mosquitto's password file: with ``mosquitto_passwd -U`` when given, else hashed here."""
    if tool is not None:
        _write_private(path, "".join(f"{user}:{pw}\n" for user, pw in passwords.items()))
        try:
            subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)
            return
        except (OSError, subprocess.SubprocessError) as exc:
            path.unlink(missing_ok=True)  # never leave clear passwords in the password file
            raise ConfigError(f"{tool} -U {path} failed: {exc}") from exc
    _write_private(path, "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in passwords.items()))


def mosquitto_security_lines(security: BrokerSecurity) -> list[str]:
    """The lines of a Mosquitto listener section that enforce ``security`` (after its ``listener`` line)."""
    lines = ["allow_anonymous false", f"acl_file {security.acl_file.resolve()}"]
    if security.tls is not None:
        lines += [
            f"cafile {security.tls.ca_file.resolve()}",
            f"certfile {security.tls.cert_file.resolve()}",
            f"keyfile {security.tls.key_file.resolve()}",
        ]
    if security.client_certs:
        lines += ["require_certificate true", "use_identity_as_username true"]
    else:
        lines.append(f"password_file {security.password_file.resolve()}")
    return lines


def write_broker_config(
    out: Path,
    federation: str,
    devices: Sequence[str],
    *,
    hub_user: str = "hub",
    port: int = 8883,
    bind: str = "0.0.0.0",
    tls: bool = False,
    client_certs: bool = False,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    passwd_tool: str | None = "auto",
) -> BrokerSecurity:
    """Write a ready Mosquitto deployment into ``out`` and return what it enforces.

    Files: ``mosquitto.conf``, ``passwd`` (Mosquitto format), ``amqtt_passwd``, ``acl``,
    ``credentials.txt`` and ``passwords/<user>`` (clear, 0600), ``security.json``; with ``tls`` also
    ``ca.crt``/``ca.key``/``server.crt``/``server.key``, and with ``client_certs``
    ``clients/<user>.crt``/``.key``. ``passwd_tool="auto"`` hashes with ``mosquitto_passwd`` when
    installed, ``None`` always in Python.
    """
    _check_name("federation", federation)
    _check_name("hub user", hub_user)
    names = [_check_name("device id", d.strip()) for d in devices if d.strip()]
    if not names:
        raise ConfigError("broker-config needs at least one device id")
    if len(set(names)) != len(names) or hub_user in names:
        raise ConfigError("device ids must be unique and differ from the hub user")
    if not 0 < port < 65536:
        raise ConfigError(f"invalid port {port}")
    tls = tls or client_certs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: TlsFiles | None = None
    if tls:
        from ffm_hub.certs import write_ca, write_cert

        ca_cert, ca_key = write_ca(out / "ca.crt", out / "ca.key", f"FFM {federation} CA")
        write_cert(out / "server.crt", out / "server.key", ca_cert, ca_key, "ffm-broker", hostnames=hostnames)
        files = TlsFiles(out / "ca.crt", out / "server.crt", out / "server.key")
        if client_certs:
            for user in [hub_user, *names]:
                write_cert(out / "clients" / f"{user}.crt", out / "clients" / f"{user}.key", ca_cert, ca_key, user)
    security = BrokerSecurity(out, federation, tuple(names), hub_user, files, client_certs)

    passwords = {user: secrets.token_urlsafe(24) for user in [hub_user, *names]}
    _write_private(security.credentials_file, "".join(f"{u}:{p}\n" for u, p in passwords.items()))
    for user, password in passwords.items():
        _write_private(security.password_path(user), password + "\n")
    tool = find_mosquitto_passwd() if passwd_tool == "auto" else passwd_tool
    _mosquitto_passwd_file(security.password_file, passwords, tool)
    _write_private(
        security.amqtt_password_file, "".join(f"{u}:{amqtt_password_hash(p)}\n" for u, p in passwords.items())
    )
    security.acl_file.write_text(mosquitto_acl(federation, hub_user))
    conf = [
        "# written by ffm-hub broker-config",
        "per_listener_settings false",
        "persistence false",
        f"listener {port} {bind}",
        *mosquitto_security_lines(security),
        "log_dest stderr",
        "connection_messages true",
        "",
    ]
    (out / "mosquitto.conf").write_text("\n".join(conf))
    manifest: dict[str, Any] = {
        "federation": federation,
        "devices": names,
        "hub_user": hub_user,
        "tls": files is not None,
        "client_certs": client_certs,
    }
    (out / SECURITY_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    secret = [security.password_file, security.acl_file] + ([files.key_file] if files is not None else [])
    _give_to_broker_user(secret)
    return security


def _give_to_broker_user(paths: Sequence[Path]) -> None:
    """Run as root, hand the broker's own files to the ``mosquitto`` user: Mosquitto started as root drops
    to that user before it reads them, and they stay 0600 (not readable by the devices' users)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    import pwd

    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in paths:
        os.chown(path, user.pw_uid, user.pw_gid)


def load_broker_security(folder: Path) -> BrokerSecurity:
    """Read a folder written by :func:`write_broker_config`; ConfigError if it is missing or incomplete."""
    folder = Path(folder)
    path = folder / SECURITY_FILE
    try:
        doc = json.loads(path.read_text())
        security = BrokerSecurity(
            folder=folder,
            federation=str(doc["federation"]),
            devices=tuple(str(d) for d in doc["devices"]),
            hub_user=str(doc["hub_user"]),
            tls=TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key") if doc["tls"] else None,
            client_certs=bool(doc["client_certs"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a broker security folder (run `ffm-hub broker-config`): {exc}") from exc
    needed = [security.acl_file, security.password_file, security.amqtt_password_file]
    if security.tls is not None:
        needed += [security.tls.ca_file, security.tls.cert_file, security.tls.key_file]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"broker security folder {folder} lacks {', '.join(missing)}")
    return security
