"""A TCP chaos proxy for the fault scenarios: clients connect to it, it forwards to the broker, and it
resets connections on purpose.

Connection resets are what a flaky mobile network does to an MQTT client in the middle of an upload;
they cannot be produced by the broker or the client themselves, so the scenarios put this proxy between
the devices and a real broker. It is one thread with a selector (no thread per connection), it counts
the resets it injected (the figures table reports them), and a reset is a real TCP RST to both ends
(``SO_LINGER`` 0), with whatever bytes were in flight through the proxy dropped.

    with ChaosProxy(broker.host, broker.port, reset_probability=0.02, seed=1) as proxy:
        transport = MqttTransport(proxy.host, proxy.port)   # the device talks to the proxy
        ...
        proxy.resets                                        # how many connections it reset
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["ChaosProxy"]

log = logging.getLogger("ffm.reliability.proxy")

_RECV_BYTES = 64 * 1024


@dataclass(eq=False)
class _Pipe:
    """One proxied connection: the client's socket, the broker's, and the bytes waiting for each."""

    client: socket.socket
    upstream: socket.socket
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    def outgoing(self, sock: socket.socket) -> bytearray:
        """The bytes waiting to be written to ``sock``."""
        return self.to_upstream if sock is self.upstream else self.to_client


class ChaosProxy:
    """Forwards TCP between clients and ``upstream_host:upstream_port``, resetting connections on demand.

    ``reset_probability``: the chance that a chunk of client-to-broker bytes of at least ``min_reset_bytes``
    (e.g. a piece of an upload rather than a 2-byte PINGREQ) is dropped and its connection reset instead of
    forwarded. :meth:`reset_all` resets every live connection now, from any thread. ``seed`` makes the
    random draws repeatable (the timing of the traffic still varies from run to run).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        reset_probability: float = 0.0,
        min_reset_bytes: int = 0,
        seed: int = 0,
        bind: str = "127.0.0.1",
    ) -> None:
        if not 0.0 <= reset_probability <= 1.0:
            raise ValueError(f"reset_probability must be in [0, 1], got {reset_probability}")
        self.upstream = (upstream_host, upstream_port)
        self.reset_probability = reset_probability
        self.min_reset_bytes = min_reset_bytes
        self._random = random.Random(seed)
        self._bind = bind
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None  # a socket pair that wakes the loop from other threads
        self._wake_w: socket.socket | None = None
        self._requests: list[Future[int]] = []
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self._thread: threading.Thread | None = None
        self._running = False
        self._port = 0
        self._resets = 0
        self._connections = 0

    # -- figures ------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """Where clients connect."""
        return self._bind

    @property
    def port(self) -> int:
        """The proxy's port (known once started)."""
        return self._port

    @property
    def resets(self) -> int:
        """Connections reset on purpose so far (random draws and :meth:`reset_all`)."""
        return self._resets

    @property
    def connections(self) -> int:
        """Client connections accepted so far (each reconnect counts)."""
        return self._connections

    @property
    def live(self) -> int:
        """Connections open right now."""
        return len(self._pipes)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on a free port of ``bind`` and start forwarding."""
        if self._thread is not None:
            return
        listener = socket.socket(socket.AF_INET6 if ":" in self._bind else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._bind, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._port = int(listener.getsockname()[1])
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="ffm-chaos-proxy", daemon=True)
        self._thread.start()
        log.info("chaos proxy %s:%d -> %s:%d", self._bind, self._port, *self.upstream)

    def stop(self) -> None:
        """Close every connection (gracefully) and the listener; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._running = False
        self._wake()
        thread.join(timeout=10.0)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def reset_all(self, timeout: float = 10.0) -> int:
        """Reset every live connection now; returns how many were reset."""
        if self._thread is None:
            raise RuntimeError("the proxy is not running")
        request: Future[int] = Future()
        with self._lock:
            self._requests.append(request)
        self._wake()
        return request.result(timeout)

    def __enter__(self) -> ChaosProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full: the loop is awake anyway
            pass

    # -- the loop (proxy thread only) ---------------------------------------------------------------
    def _loop(self) -> None:
        assert self._selector is not None and self._listener is not None
        try:
            while self._running:
                for key, events in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        self._on_ready(key.data, key.fileobj, events)  # type: ignore[arg-type]
                self._serve_requests()
        finally:
            for pipe in list(self._pipes):
                self._close(pipe, reset=False)
            self._selector.close()
            self._listener.close()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _serve_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            pipes = [pipe for pipe in self._pipes if not pipe.closed]
            for pipe in pipes:
                self._close(pipe, reset=True)
            self._resets += len(pipes)
            request.set_result(len(pipes))

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            client, _address = self._listener.accept()
        except BlockingIOError:
            return
        self._connections += 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError as exc:  # the broker is down (e.g. restarting): the client sees a reset and retries
            log.debug("upstream %s:%d refused a connection: %s", *self.upstream, exc)
            _reset_socket(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _Pipe(client, upstream)
        self._pipes.add(pipe)
        self._selector.register(client, selectors.EVENT_READ, pipe)
        self._selector.register(upstream, selectors.EVENT_READ, pipe)

    def _on_ready(self, pipe: _Pipe, sock: socket.socket, events: int) -> None:
        if pipe.closed:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(pipe, sock)
        if not pipe.closed and events & selectors.EVENT_READ:
            self._read(pipe, sock)
        if not pipe.closed:
            self._update_interest(pipe)

    def _read(self, pipe: _Pipe, sock: socket.socket) -> None:
        try:
            data = sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe, reset=False)
            return
        if not data:  # one side closed: pass on what is buffered, then close both
            self._close(pipe, reset=False)
            return
        if sock is pipe.client and self._draw_reset(len(data)):
            self._resets += 1
            self._close(pipe, reset=True)
            return
        target = pipe.peer(sock)
        pipe.outgoing(target).extend(data)
        self._flush(pipe, target)

    def _draw_reset(self, size: int) -> bool:
        return size >= self.min_reset_bytes and self._random.random() < self.reset_probability

    def _flush(self, pipe: _Pipe, sock: socket.socket) -> None:
        buffer = pipe.outgoing(sock)
        if not buffer:
            return
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe, reset=False)
            return
        del buffer[:sent]

    def _update_interest(self, pipe: _Pipe) -> None:
        assert self._selector is not None
        # Always read (MQTT's own flow control, QoS 1 in-flight windows, bounds what piles up here);
        # watch for writability only while bytes wait for a socket.
        for sock in (pipe.client, pipe.upstream):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pipe.outgoing(sock) else 0)
            if self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events, pipe)

    def _close(self, pipe: _Pipe, *, reset: bool) -> None:
        """Close both sides: with a RST (``reset``), or after a best-effort flush of what is buffered."""
        if pipe.closed:
            return
        pipe.closed = True
        self._pipes.discard(pipe)
        assert self._selector is not None
        for sock in (pipe.client, pipe.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset_socket(sock)
                continue
            buffer = pipe.outgoing(sock)
            try:
                if buffer:
                    sock.send(buffer)
            except OSError:
                pass
            sock.close()


def _reset_socket(sock: socket.socket) -> None:
    """Close with ``SO_LINGER`` 0: the peer gets a TCP RST, not a FIN (what a dropped network looks like)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
