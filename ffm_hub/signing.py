"""The hub's side of signed updates: enrolled device keys, update checks, and its own signing key.

Why a module of its own: the accept path (:mod:`ffm_hub.hub`) asks one question — "may this update be
queued?" — and gets back ``None`` or a typed reason; keys, files and clocks stay here.

Order of the checks (each a :class:`~ffm_edge.wire.Rejection` reason):

1. ``unknown_device``: no enrolled public key for the device the update names;
2. ``bad_signature``: unsigned, malformed, or not verifying with that key over (federation, device,
   update id, base version, payload sha256, timestamp);
3. replay: when the update id was already accepted, an identical resend (same payload sha256) is *not*
   an attack but a QoS-1 redelivery or a device that missed its receipt, so it is receipted again as a
   duplicate (today's behaviour, whatever its timestamp); a different payload under a used id is
   ``replayed``. Accepted updates are in the durable store, so this survives a restart or ``kill -9``;
4. ``stale_timestamp``: the signature's timestamp is more than ``tolerance`` seconds from the hub's clock.

Enrollment: a folder of ``<device_id>.pub`` files (``ffm-edge keygen`` writes one; ``ffm-hub enroll``
copies one in). It is re-read when an unknown device shows up, so enrolling needs no restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ffm_edge.errors import ConfigError, DecodeError, SignatureError
from ffm_edge.signing import (
    format_public_key,
    frame_payload_sha256,
    load_private_key,
    load_public_key,
    parse_public_key,
    sign_global_frame,
    sign_record,
    verify_update_signature,
)
from ffm_edge.wire import Manifest, UpdateMeta, validate_id
from ffm_hub.store import HubStore

__all__ = ["DEFAULT_TOLERANCE", "HubSecurity", "enroll_device", "load_enrolled_keys"]

log = logging.getLogger("ffm.hub")

#: Default accepted clock difference between a device's signature and the hub (seconds).
DEFAULT_TOLERANCE = 300.0


def load_enrolled_keys(directory: str | Path) -> dict[str, Ed25519PublicKey]:
    """Every ``<device_id>.pub`` in ``directory`` (``ConfigError`` for a bad name or key)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"enrolled-keys folder {folder} does not exist")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(folder.glob("*.pub")):
        try:
            validate_id(path.stem, "device id")
        except DecodeError as exc:
            raise ConfigError(f"{path}: file name is not a device id: {exc}") from exc
        keys[path.stem] = load_public_key(path)
    return keys


def enroll_device(directory: str | Path, device_id: str, public_key_file: str | Path) -> Path:
    """Copy a device's public key into the enrolled-keys folder as ``<device_id>.pub`` (validated first)."""
    try:
        validate_id(device_id, "device id")
    except DecodeError as exc:
        raise ConfigError(str(exc)) from exc
    key = load_public_key(public_key_file)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{device_id}.pub"
    target.write_text(format_public_key(key) + "\n", encoding="utf-8")
    return target


@dataclass
class HubSecurity:
    """What a hub checks and signs. ``require_signatures=False`` with no key changes nothing."""

    require_signatures: bool = False
    device_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    enrolled_dir: Path | None = None  # re-read for devices not in device_keys
    hub_key: Ed25519PrivateKey | None = None  # signs manifests and served global frames
    tolerance: float = DEFAULT_TOLERANCE
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ConfigError(f"timestamp tolerance must be > 0 seconds, got {self.tolerance}")
        if self.enrolled_dir is not None:
            self.enrolled_dir = Path(self.enrolled_dir)
            self.device_keys = {**load_enrolled_keys(self.enrolled_dir), **self.device_keys}
        if self.require_signatures and not self.device_keys and self.enrolled_dir is None:
            log.warning("signatures are required but no device is enrolled: every update will be refused")

    @classmethod
    def from_files(
        cls,
        *,
        require_signatures: bool = False,
        enrolled_keys: str | Path | None = None,
        hub_key: str | Path | None = None,
        hub_key_passphrase: bytes | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        enrolled: Mapping[str, str] | None = None,
    ) -> HubSecurity:
        """Build from paths (CLI / TOML): a folder of ``.pub`` files, the hub's private key (encrypted:
        with ``hub_key_passphrase`` or $FFM_KEY_PASSPHRASE), and/or a mapping of device id to one-line public
        key."""
        keys = {device: parse_public_key(text) for device, text in (enrolled or {}).items()}
        return cls(
            require_signatures=require_signatures,
            device_keys=keys,
            enrolled_dir=Path(enrolled_keys) if enrolled_keys is not None else None,
            hub_key=load_private_key(hub_key, hub_key_passphrase) if hub_key is not None else None,
            tolerance=tolerance,
        )

    def _key_for(self, device: str) -> Ed25519PublicKey | None:
        key = self.device_keys.get(device)
        if key is None and self.enrolled_dir is not None:
            path = self.enrolled_dir / f"{device}.pub"
            if path.is_file():
                try:
                    key = load_public_key(path)
                except ConfigError as exc:
                    log.warning("enrolled key of %s is unreadable: %s", device, exc)
                    return None
                self.device_keys[device] = key
        return key

    def check_update(self, meta: UpdateMeta, frame: bytes, store: HubStore) -> tuple[str, str] | None:
        """``None`` when the update may go on to validation, else ``(reason, detail)``."""
        if not self.require_signatures:
            return None
        key = self._key_for(meta.device)
        if key is None:
            return "unknown_device", f"no enrolled key for device {meta.device!r}"
        if meta.signature is None:
            return "bad_signature", "the update is unsigned and this hub requires signatures"
        payload_sha256 = frame_payload_sha256(frame)
        try:
            timestamp_ms = verify_update_signature(
                key,
                meta.signature,
                federation=meta.federation,
                device=meta.device,
                update_id=meta.update_id,
                base_version=meta.base_version,
                payload_sha256=payload_sha256,
            )
        except SignatureError as exc:
            return "bad_signature", str(exc)
        accepted = store.get_update(meta.update_id)
        if accepted is not None:
            try:
                same = accepted.device == meta.device and frame_payload_sha256(store.load_update(meta.update_id)) == (
                    payload_sha256
                )
            except (KeyError, DecodeError):
                same = False
            if same:
                return None  # an identical resend: receipted again as a duplicate
            return "replayed", f"update id {meta.update_id} was already accepted with another payload"
        skew = timestamp_ms / 1000.0 - self.clock()
        if abs(skew) > self.tolerance:
            return "stale_timestamp", f"signed {skew:+.0f}s from the hub's clock (tolerance ±{self.tolerance:.0f}s)"
        return None

    def sign_manifest(self, manifest: Manifest) -> Manifest:
        """The manifest with the hub's signature (unchanged when the hub has no key)."""
        if self.hub_key is None:
            return manifest
        return Manifest(
            **{**manifest.to_dict(), "signature": sign_record("manifest", manifest.to_dict(), self.hub_key)}
        )

    def sign_frame(self, frame: bytes) -> bytes:
        """A global-version frame signed by the hub (unchanged when the hub has no key)."""
        return frame if self.hub_key is None else sign_global_frame(frame, self.hub_key)
