"""Ed25519 signatures on updates, manifests and global-version frames (issue 7).

Why: a broker's ACLs say which client may publish where, not that an update came unaltered from an
enrolled device, and a zeroconf answer says nothing about who runs the hub. Each device signs what it
uploads with its own key; the hub signs what it publishes with its key; each side checks the other.

What is signed (domain-separated, so a signature of one kind never verifies as another):

* an update: :func:`canonical_update_bytes` of (signature version, federation, device, update id, base
  version, payload sha256, timestamp in ms), carried in :attr:`UpdateMeta.signature` as
  ``ed25519:1:<timestamp_ms>:<base64url signature>``;
* a manifest or a global-version frame's metadata: :func:`canonical_record_bytes` of the record's JSON
  fields without ``signature`` (for a frame, with the payload's sha256), carried as ``ed25519:1:<sig>``.

Keys on disk: the private key is PKCS#8 PEM (mode 0600); the public key is one line,
``ed25519 <base64 of the 32 raw bytes>``, so it can be pasted into a config or an enrollment list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ffm_edge.errors import ConfigError, MalformedError, SignatureError
from ffm_edge.wire.envelope import MAGIC, UpdateMeta, pack_envelope, read_frame, unpack_envelope
from ffm_edge.wire.limits import DEFAULT_LIMITS, WireLimits
from ffm_edge.wire.topics import dumps_json

__all__ = [
    "PASSPHRASE_ENV",
    "SIGNATURE_VERSION",
    "UpdateSignature",
    "canonical_record_bytes",
    "canonical_update_bytes",
    "format_public_key",
    "frame_payload_sha256",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "parse_record_signature",
    "parse_update_signature",
    "read_passphrase",
    "sign_global_frame",
    "sign_record",
    "sign_update_frame",
    "verify_global_frame",
    "verify_record",
    "verify_update_signature",
    "write_keypair",
]

#: Environment variable holding the passphrase of an encrypted private key (when no passphrase file is given).
PASSPHRASE_ENV = "FFM_KEY_PASSPHRASE"

#: Version of the signed-bytes layout (bumped if what is signed ever changes).
SIGNATURE_VERSION = 1
_UPDATE_DOMAIN = b"ffm-update-signature\n"
_RECORD_DOMAIN = b"ffm-record-signature\n"
_SIG_B64_CHARS = 86  # 64 bytes, base64url without padding
_UPDATE_SIG = re.compile(r"ed25519:1:(0|[1-9][0-9]{0,15}):([A-Za-z0-9_-]{86})")
_RECORD_SIG = re.compile(r"ed25519:1:([A-Za-z0-9_-]{86})")
_PUBLIC_LINE = re.compile(r"ed25519 ([A-Za-z0-9+/]{43}=)")


@dataclass(frozen=True)
class UpdateSignature:
    """A parsed update signature: when the device signed (ms since the epoch) and the 64 signature bytes."""

    timestamp_ms: int
    signature: bytes

    def encode(self) -> str:
        """The text carried in :attr:`UpdateMeta.signature`."""
        return f"ed25519:{SIGNATURE_VERSION}:{self.timestamp_ms}:{_b64url(self.signature)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- what is signed ---------------------------------------------------------------------------------------
def canonical_update_bytes(
    *, federation: str, device: str, update_id: str, base_version: int, payload_sha256: str, timestamp_ms: int
) -> bytes:
    """The exact bytes a device signs for an update (pinned by a test: changing them breaks the wire)."""
    fields = [SIGNATURE_VERSION, federation, device, update_id, base_version, payload_sha256, timestamp_ms]
    return _UPDATE_DOMAIN + json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def canonical_record_bytes(kind: str, record: Mapping[str, Any]) -> bytes:
    """The bytes the hub signs for a manifest or a frame's metadata: ``kind`` and the record without its
    ``signature``, as canonical JSON (sorted keys; Python floats round-trip through JSON exactly)."""
    body = {k: v for k, v in record.items() if k != "signature"}
    return _RECORD_DOMAIN + dumps_json({"kind": kind, "record": body, "v": SIGNATURE_VERSION})


# -- parsing (network text: every failure is a MalformedError) --------------------------------------------
def parse_update_signature(text: object) -> UpdateSignature:
    """Parse ``ed25519:1:<timestamp_ms>:<sig>`` from an update's metadata."""
    if not isinstance(text, str):
        raise MalformedError(f"update signature must be a string, got {type(text).__name__}")
    match = _UPDATE_SIG.fullmatch(text)
    if match is None:
        raise MalformedError("update signature is not 'ed25519:1:<timestamp_ms>:<base64url signature>'")
    return UpdateSignature(int(match.group(1)), _decode_sig(match.group(2)))


def parse_record_signature(text: object) -> bytes:
    """Parse ``ed25519:1:<sig>`` from a manifest or a global frame's metadata."""
    if not isinstance(text, str):
        raise MalformedError(f"record signature must be a string, got {type(text).__name__}")
    match = _RECORD_SIG.fullmatch(text)
    if match is None:
        raise MalformedError("record signature is not 'ed25519:1:<base64url signature>'")
    return _decode_sig(match.group(1))


def _decode_sig(text: str) -> bytes:
    try:
        raw = _unb64url(text)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex admits only valid text
        raise MalformedError("signature is not base64url") from exc
    if len(raw) != 64 or _b64url(raw) != text:  # non-canonical trailing bits
        raise MalformedError("signature is not 64 bytes of canonical base64url")
    return raw


# -- updates ----------------------------------------------------------------------------------------------
def frame_payload_sha256(frame: bytes, *, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """The payload sha256 an envelope's header declares (checked against the payload by the decoders)."""
    _, header, _ = read_frame(frame, magic=MAGIC, max_size=limits.max_frame_bytes, limits=limits, what="envelope")
    digest = header.get("payload_sha256")
    if not isinstance(digest, str):
        raise MalformedError("envelope header has no payload_sha256")
    return digest


def sign_update_frame(
    frame: bytes, key: Ed25519PrivateKey, *, now: float | None = None, limits: WireLimits = DEFAULT_LIMITS
) -> bytes:
    """The same update frame with a fresh signature (timestamp ``now``) in its metadata's signature slot.

    The payload bytes are unchanged; only the header's ``meta.signature`` is set (replaced if present).
    """
    envelope = unpack_envelope(frame, limits=limits, expected_kind="update")
    meta = UpdateMeta.from_dict(envelope.meta)
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    message = canonical_update_bytes(
        federation=meta.federation,
        device=meta.device,
        update_id=meta.update_id,
        base_version=meta.base_version,
        payload_sha256=hashlib.sha256(envelope.payload).hexdigest(),
        timestamp_ms=timestamp_ms,
    )
    signature = UpdateSignature(timestamp_ms, key.sign(message)).encode()
    return pack_envelope("update", {**meta.to_dict(), "signature": signature}, envelope.payload, limits=limits)


def verify_update_signature(
    key: Ed25519PublicKey,
    signature_text: object,
    *,
    federation: str,
    device: str,
    update_id: str,
    base_version: int,
    payload_sha256: str,
) -> int:
    """Check an update's signature; return its timestamp (ms). ``SignatureError`` when it does not verify."""
    try:
        parsed = parse_update_signature(signature_text)
    except MalformedError as exc:
        raise SignatureError(str(exc)) from exc
    message = canonical_update_bytes(
        federation=federation,
        device=device,
        update_id=update_id,
        base_version=base_version,
        payload_sha256=payload_sha256,
        timestamp_ms=parsed.timestamp_ms,
    )
    try:
        key.verify(parsed.signature, message)
    except InvalidSignature as exc:
        raise SignatureError(f"update {update_id}: signature does not verify with {device}'s key") from exc
    return parsed.timestamp_ms


# -- manifests and global frames --------------------------------------------------------------------------
def sign_record(kind: str, record: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The ``signature`` text of a manifest (``kind="manifest"``) or a frame's metadata."""
    return f"ed25519:{SIGNATURE_VERSION}:{_b64url(key.sign(canonical_record_bytes(kind, record)))}"


def verify_record(kind: str, record: Mapping[str, Any], key: Ed25519PublicKey) -> None:
    """``SignatureError`` unless ``record["signature"]`` is the hub's signature of the rest of ``record``."""
    if record.get("signature") is None:
        raise SignatureError(f"unsigned {kind}: the hub's signature is required")
    try:
        raw = parse_record_signature(record["signature"])
    except MalformedError as exc:
        raise SignatureError(f"{kind}: {exc}") from exc
    try:
        key.verify(raw, canonical_record_bytes(kind, record))
    except InvalidSignature as exc:
        raise SignatureError(f"{kind} signature does not verify with the hub's key") from exc


def sign_global_frame(frame: bytes, key: Ed25519PrivateKey, *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """A global-version frame whose metadata carries the hub's signature over (metadata, payload sha256)."""
    envelope = unpack_envelope(frame, limits=limits, expected_kind="global")
    meta = {k: v for k, v in envelope.meta.items() if k != "signature"}
    record = {**meta, "payload_sha256": hashlib.sha256(envelope.payload).hexdigest()}
    return pack_envelope(
        "global", {**meta, "signature": sign_record("global", record, key)}, envelope.payload, limits=limits
    )


def verify_global_frame(frame: bytes, key: Ed25519PublicKey, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """``SignatureError`` unless the frame's metadata and payload are signed by the hub's key."""
    envelope = unpack_envelope(frame, limits=limits, expected_kind="global")
    record = {**envelope.meta, "payload_sha256": hashlib.sha256(envelope.payload).hexdigest()}
    verify_record("global", record, key)


# -- keys -------------------------------------------------------------------------------------------------
def generate_private_key() -> Ed25519PrivateKey:
    """A new random Ed25519 key."""
    return Ed25519PrivateKey.generate()


def format_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519 <base64 of the 32 raw bytes>``: the one-line form of ``.pub`` files and enrollment lists."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519 " + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Read a public key from its one-line form (``ConfigError`` when it is not one)."""
    match = _PUBLIC_LINE.fullmatch(text.strip())
    if match is None:
        raise ConfigError("a public key must be one line 'ed25519 <base64 of 32 bytes>'")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(match.group(1)))


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a ``.pub`` file written by :func:`write_keypair`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    try:
        return parse_public_key(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def read_passphrase(path: str | Path | None) -> bytes | None:
    """The passphrase of an encrypted private key: the first line of the file ``path`` (a file, so it never
    shows in a process list or shell history), else ``$FFM_KEY_PASSPHRASE``, else None."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {path}: {exc.strerror or exc}") from exc
        line = text.splitlines()[0] if text else ""
        if not line:
            raise ConfigError(f"passphrase file {path} is empty")
        return line.encode("utf-8")
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read a private key file written by :func:`write_keypair` (PKCS#8 PEM).

    An encrypted key needs ``passphrase``, or ``$FFM_KEY_PASSPHRASE`` when it is None; an unencrypted key
    loads without one. Every failure is a :class:`ConfigError` that says which of these it is.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror or exc}") from exc
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and passphrase is None:
        passphrase = read_passphrase(None)
        if passphrase is None:
            raise ConfigError(
                f"{path} is encrypted: give its passphrase in a file (--key-passphrase-file, or "
                f"--hub-key-passphrase-file on the hub) or in ${PASSPHRASE_ENV}"
            )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        what = "wrong passphrase, or not a valid encrypted key" if encrypted else "not a PEM private key"
        raise ConfigError(f"{path}: {what}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key


def write_keypair(
    directory: str | Path, name: str, *, overwrite: bool = False, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Create ``name.key`` (mode 0600, created that way so it is never readable by others) and
    ``name.pub`` in ``directory``; return both paths. Refuses to replace an existing key. With
    ``passphrase`` the private key is encrypted (PKCS#8, the best encryption ``cryptography`` offers), so a
    copy of the file alone does not sign anything."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise ConfigError(f"{private_path} or {public_path} exists; not replacing a key")
    key = generate_private_key()
    if passphrase is not None and not passphrase:
        raise ConfigError("an empty passphrase would encrypt nothing; give a non-empty one, or none")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(private_path, 0o600)
    public_path.write_text(format_public_key(key) + "\n", encoding="utf-8")
    return private_path, public_path
