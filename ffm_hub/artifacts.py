"""Serve ONNX Runtime training artifacts to devices that ask for them (``ffm-hub serve --ort-artifacts``).

A device without torch cannot export its model, so the hub builds the artifacts for it: lazily, on the
first request per strategy, in a worker thread (an export takes seconds of CPU and must not stall the
hub's message loop), from the hub's current global version, which the manifest records. Builds are
cached on disk under ``cache_dir``, keyed by model, task and strategy and by the global version built
from, and served again after a restart. A finished build is one ``"artifacts"`` envelope around a tar of
the folder (:mod:`ffm_edge.ort.archive`), sent as hashed chunks on the device's artifact downlink by a
sender thread, so a 90 MB transfer does not hold up receipts either.

A device repeats its request while it has heard nothing (the hub may not have been subscribed yet, and no
broker holds the request for it): a repeat of a transfer already queued or sent is ignored, and one for a
build under way is answered with another :class:`~ffm_edge.wire.ArtifactPending`, so a device notices a
hub that died mid-build. A device that misses chunks asks again under a new transfer id. A request the hub
cannot serve is answered with an :class:`~ffm_edge.wire.ArtifactError` reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffm_edge.errors import FFMError, TransportError
from ffm_edge.memory import ORT_FAMILIES, ORT_STRATEGIES
from ffm_edge.ort.manifest import FORMAT_VERSION
from ffm_edge.spec import ModelSpec
from ffm_edge.transport import Transport
from ffm_edge.wire import (
    DEFAULT_LIMITS,
    MAX_DETAIL_CHARS,
    ArtifactError,
    ArtifactMeta,
    ArtifactPending,
    ArtifactRequest,
    Topics,
    WireLimits,
    decode_artifacts,
    encode_artifacts,
    encode_message,
    iter_chunks,
)

__all__ = ["DEFAULT_ARTIFACT_CHUNK", "ArtifactService"]

log = logging.getLogger("ffm.hub.artifacts")

#: Bytes per MQTT message of an artifact transfer: larger than a global version's chunks (the set is
#: ~90 MB for MiniLM), well under Mosquitto's and amqtt's message limits and the wire's max_chunk_bytes.
DEFAULT_ARTIFACT_CHUNK = 1024 * 1024

State = dict[str, np.ndarray]
_FRAME = re.compile(r"v(\d{10})\.ffma")


@dataclass
class _Build:
    """A build in progress: who waits for it."""

    waiters: list[tuple[str, str]]


class ArtifactService:
    """Builds, caches and sends one federation's ORT artifacts; :class:`~ffm_hub.hub.Hub` drives it.

    ``strategies``: the strategies this federation accepts (a device asking for another one is refused).
    ``build`` is :func:`ffm_edge.ort.artifacts.build_artifacts` unless given (same signature).
    """

    def __init__(
        self,
        spec: ModelSpec,
        task: str,
        cache_dir: str | Path,
        *,
        strategies: Collection[str],
        chunk_size: int = DEFAULT_ARTIFACT_CHUNK,
        seed: int = 0,
        publish_timeout: float = 60.0,
        limits: WireLimits = DEFAULT_LIMITS,
        build: Callable[..., object] | None = None,
    ) -> None:
        if not 1024 <= chunk_size <= limits.max_chunk_bytes:
            raise ValueError(f"chunk_size must be in [1024, {limits.max_chunk_bytes}], got {chunk_size}")
        self.spec = spec
        self.task = task
        self.strategies = tuple(strategies)
        self.chunk_size = chunk_size
        self.seed = seed
        self.publish_timeout = publish_timeout
        self.limits = limits
        key = json.dumps([spec.name, spec.max_length, spec.family, task, FORMAT_VERSION]).encode()
        self.cache_dir = Path(cache_dir) / f"{_safe(spec.name)}-{task}-{hashlib.sha256(key).hexdigest()[:12]}"
        self._build_fn = build
        self._lock = threading.Lock()
        self._ready: dict[str, Path] = {}  # strategy -> verified frame file
        self._building: dict[str, _Build] = {}
        self._queue: OrderedDict[str, tuple[str, Path]] = OrderedDict()  # device -> (transfer id, frame)
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # (device, transfer id) asked for
        self._wake = threading.Condition(self._lock)
        self._transport: Transport | None = None
        self._topics: Topics | None = None
        self._federation = ""
        self._executor: ThreadPoolExecutor | None = None
        self._sender: threading.Thread | None = None
        self._stopping = False
        self.transfers = 0  # transfers sent whole (for tests and logs)
        self.builds = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, transport: Transport, federation: str) -> None:
        """Begin serving on ``transport`` (the hub's)."""
        self._transport, self._federation, self._topics = transport, federation, Topics(federation)
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ffm-ort-build")
        self._sender = threading.Thread(target=self._send_loop, name="ffm-ort-sender", daemon=True)
        self._sender.start()

    def stop(self) -> None:
        """Stop sending (a transfer in flight ends at its next chunk) and wait for a running build."""
        with self._lock:
            self._stopping = True
            self._queue.clear()
            self._wake.notify_all()
        if self._sender is not None:
            self._sender.join(timeout=30)
            self._sender = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- requests (the hub's worker thread) -----------------------------------------------------------
    def handle(self, device: str, request: ArtifactRequest, snapshot: Callable[[], tuple[int, State]]) -> None:
        """Answer one request: refuse it, queue the cached build, or start (or join) a build.

        ``snapshot`` gives the current global version and state; it is called only when a build starts.
        """
        problem = self._refusal(request)
        if problem is not None:
            self._answer(device, ArtifactError(request.transfer_id, *problem).sendable())
            return
        strategy = request.strategy
        key = (device, request.transfer_id)
        with self._lock:
            repeat = key in self._seen  # the device asks again while it has heard nothing (a liveness ping)
            self._seen[key] = None
            while len(self._seen) > 4096:
                self._seen.popitem(last=False)
            ready = self._ready.get(strategy)
            if ready is not None:
                if not repeat:  # a repeat of a queued or sent transfer: its chunks are on their way
                    self._enqueue(device, request.transfer_id, ready)
                return
            build = self._building.get(strategy)
            starting = build is None
            if build is None:
                build = self._building[strategy] = _Build([])
            if key not in build.waiters:
                build.waiters.append(key)
        detail = f"building {self.spec.name}/{strategy} artifacts" if starting else "the build is under way"
        self._answer(device, ArtifactPending(request.transfer_id, detail))
        if starting:
            assert self._executor is not None, "start() first"
            version, state = snapshot()
            self._executor.submit(self._prepare, strategy, version, state)

    def _refusal(self, request: ArtifactRequest) -> tuple[str, str] | None:
        if request.runtime != "ort":
            return "unknown_runtime", f"this hub builds artifacts for the ort runtime, not {request.runtime!r}"
        if request.model != self.spec.name:
            return "unknown_model", f"this federation trains {self.spec.name}, not {request.model}"
        if request.task != self.task:
            return "unknown_task", f"this federation trains task {self.task}, not {request.task}"
        if request.strategy not in self.strategies:
            return "unknown_strategy", f"this federation trains {', '.join(self.strategies)}"
        if request.strategy not in ORT_STRATEGIES:
            return "unsupported", f"the ORT runtime trains {', '.join(sorted(ORT_STRATEGIES))}, not {request.strategy}"
        if self.spec.family not in ORT_FAMILIES:
            families = ", ".join(sorted(ORT_FAMILIES))
            return "unsupported", f"the ORT runtime exports {families} models; {self.spec.name} is {self.spec.family}"
        return None

    # -- building (the build thread) ------------------------------------------------------------------
    def _prepare(self, strategy: str, version: int, state: State) -> None:
        try:
            frame = self._cached(strategy) or self._build(strategy, version, state)
        except Exception as exc:
            reason = "too_large" if isinstance(exc, _TooLarge) else "build_failed"
            log.exception("building %s/%s ORT artifacts failed", self.spec.name, strategy)
            with self._lock:
                build = self._building.pop(strategy, _Build([]))
            for device, transfer_id in build.waiters:
                self._answer(device, ArtifactError(transfer_id, reason, _detail(exc)).sendable())
            return
        with self._lock:
            self._ready[strategy] = frame
            build = self._building.pop(strategy, _Build([]))
            for device, transfer_id in build.waiters:
                self._enqueue(device, transfer_id, frame)

    def _cached(self, strategy: str) -> Path | None:
        """The newest verified build of ``strategy`` on disk (a damaged one is deleted and rebuilt)."""
        folder = self.cache_dir / strategy
        frames = sorted(folder.glob("v*.ffma"), reverse=True) if folder.is_dir() else []
        for path in frames:
            if _FRAME.fullmatch(path.name) is None:
                continue
            try:
                meta, _archive = decode_artifacts(path.read_bytes(), limits=self.limits)
            except (OSError, FFMError) as exc:
                log.warning("discarding the damaged cached artifacts %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            if (meta.model, meta.task, meta.strategy, meta.federation) == (
                self.spec.name,
                self.task,
                strategy,
                self._federation,
            ):
                log.info(
                    "serving cached %s artifacts of global version %d from %s", strategy, meta.global_version, path
                )
                return path
        return None

    def _build(self, strategy: str, version: int, state: State) -> Path:
        from ffm_edge.ort.archive import pack_folder
        from ffm_edge.ort.artifacts import build_artifacts

        build = self._build_fn or build_artifacts
        folder = self.cache_dir / strategy
        work = folder / f"v{version:010d}"
        started = time.perf_counter()
        log.info("building %s/%s ORT artifacts from global version %d", self.spec.name, strategy, version)
        try:
            build(self.spec, self.task, strategy, work, global_state=state, global_version=version, seed=self.seed)
            archive, files = pack_folder(work)
        finally:  # the frame below holds everything: keep one copy on disk, and no half-built folder
            shutil.rmtree(work, ignore_errors=True)
        meta = ArtifactMeta(
            federation=self._federation,
            model=self.spec.name,
            task=self.task,
            strategy=strategy,
            runtime="ort",
            global_version=version,
            archive="tar",
            files=files,
            created_at=time.time(),
        )
        try:
            frame = encode_artifacts(meta, archive, limits=self.limits)
        except ValueError as exc:
            raise _TooLarge(str(exc)) from exc
        if len(frame) > self.limits.max_frame_bytes:
            raise _TooLarge(f"{len(frame)} bytes exceed the wire's frame limit of {self.limits.max_frame_bytes}")
        path = folder / f"v{version:010d}.ffma"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(frame)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        self.builds += 1
        log.info(
            "built %s/%s artifacts from global version %d: %d files, %d bytes, %.1fs",
            self.spec.name, strategy, version, files, len(frame), time.perf_counter() - started,
        )  # fmt: skip
        return path

    # -- sending (the sender thread) ------------------------------------------------------------------
    def _enqueue(self, device: str, transfer_id: str, frame: Path) -> None:
        """Queue a transfer (lock held); a device's newer request replaces its queued older one."""
        self._queue.pop(device, None)
        self._queue[device] = (transfer_id, frame)
        self._wake.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                device, (transfer_id, path) = self._queue.popitem(last=False)
            try:
                self._send(device, transfer_id, path)
            except Exception:  # the device times out and asks again
                log.exception("sending artifacts %s to %s failed", transfer_id, device)

    def _send(self, device: str, transfer_id: str, path: Path) -> None:
        assert self._transport is not None and self._topics is not None
        frame = path.read_bytes()
        topic = self._topics.downlink_artifacts(device)
        started = time.perf_counter()
        for chunk in iter_chunks(frame, chunk_size=self.chunk_size, transfer_id=transfer_id, limits=self.limits):
            if self._stopping:
                return
            self._transport.publish(topic, chunk, qos=1, timeout=self.publish_timeout)
        self.transfers += 1
        log.info("sent %s (%d bytes) to %s in %.1fs", path.name, len(frame), device, time.perf_counter() - started)

    def _answer(self, device: str, message: ArtifactError | ArtifactPending) -> None:
        assert self._transport is not None and self._topics is not None
        try:
            self._transport.publish(
                self._topics.downlink_control(device), encode_message(message), qos=1, timeout=self.publish_timeout
            )
        except TransportError as exc:  # the device times out and asks again
            log.warning("could not answer %s's artifact request: %s", device, exc)


class _TooLarge(FFMError):
    """The artifacts do not fit in one frame of the wire's limits."""


def _detail(exc: BaseException) -> str:
    """An exception as a one-line detail the wire accepts (no control characters, bounded length)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return "".join(ch for ch in text if ch.isprintable())[:MAX_DETAIL_CHARS]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
