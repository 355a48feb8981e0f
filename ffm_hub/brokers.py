"""MQTT brokers the hub runs itself, so that one command runs a whole federation on one machine.

Mosquitto (a subprocess) when its binary is installed; otherwise amqtt, in process, as the zero-install
fallback. amqtt 0.12 is good enough for a demo but keeps no session for anonymous clients that go away,
never sends the Last Will of a client that goes silent without closing its socket, and is much slower,
so the protocol never relies on the broker to hold anything (see DESIGN.md, "Brokers and discovery").
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

from ffm_edge.errors import BrokerError, ConfigError
from ffm_hub.security import BrokerSecurity, amqtt_acls, mosquitto_security_lines

__all__ = [
    "AmqttBroker",
    "ManagedBroker",
    "MosquittoBroker",
    "find_mosquitto",
    "free_port",
    "start_managed_broker",
]

log = logging.getLogger("ffm.broker")

_MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_INSTALL_HINT = "install it with `apt-get install mosquitto` (Debian/Ubuntu) or `brew install mosquitto`"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_PORT_ATTEMPTS = 3  # a port picked free can be taken by someone else before the broker binds it


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, else in the sbin directories that are often not on PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_PATHS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(bind: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``bind`` right now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bind, 0))
        return int(sock.getsockname()[1])


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedBroker(abc.ABC):
    """A broker whose lifetime the hub owns; a context manager (start on enter, stop on exit)."""

    kind: ClassVar[str]

    def __init__(
        self,
        port: int = 0,
        bind: str = "127.0.0.1",
        start_timeout: float = 10.0,
        security: BrokerSecurity | None = None,
    ) -> None:
        if not 0 <= port < 65536:
            raise ConfigError(f"invalid broker port {port}")
        self.security = security  # None: anonymous, plain TCP (the default)
        self._bind = bind
        self._port = port  # 0 until the first start picks one; then kept across restarts
        self._auto_port = port == 0
        self.start_timeout = start_timeout

    @property
    def bind(self) -> str:
        """The address the broker listens on."""
        return self._bind

    @property
    def host(self) -> str:
        """Where a local client connects: the bind address, or loopback when bound to every interface."""
        return _WILDCARDS.get(self._bind, self._bind)

    @property
    def port(self) -> int:
        """The TCP port (known once started when constructed with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (``mqtts://`` with TLS) for :func:`ffm_edge.transport.parse_broker_url`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "mqtts" if self.security is not None and self.security.tls is not None else "mqtt"
        return f"{scheme}://{host}:{self._port}"

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """True between a successful start() and stop()."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start and return once the broker accepts TCP connections; BrokerError otherwise."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop and release the port; safe to call twice."""

    def restart(self) -> None:
        """Stop and start again on the same port: every client is disconnected and must reconnect."""
        self.stop()
        self.start()

    def _pick_port(self, attempt: int) -> int:
        if self._auto_port and (attempt > 0 or self._port == 0):
            self._port = free_port(self._bind)
        return self._port

    def _attempts(self) -> int:
        return _PORT_ATTEMPTS if self._auto_port else 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, running={self.running})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_live_mosquittos: weakref.WeakSet[MosquittoBroker] = weakref.WeakSet()


@atexit.register
def _stop_live_mosquittos() -> None:
    """A mosquitto runs in its own session (so Ctrl-C reaches the hub first); never outlive the hub."""
    for broker in list(_live_mosquittos):
        broker.stop()


class MosquittoBroker(ManagedBroker):
    """Mosquitto as a subprocess with a generated config: anonymous, no persistence, log in ``workdir``.

    Mosquitto's default ``message_size_limit`` (0: the MQTT maximum, 256 MiB) already admits 4 MiB
    chunks, so the config leaves it alone. The log is mosquitto's stderr, captured by us, so the file
    stays writable after mosquitto drops root privileges.
    """

    kind = "mosquitto"

    def __init__(
        self,
        port: int = 0,
        bind: str = "127.0.0.1",
        workdir: Path | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
        security: BrokerSecurity | None = None,
    ) -> None:
        super().__init__(port, bind, start_timeout, security)
        self._binary = binary
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def workdir(self) -> Path | None:
        """Where the config and log live (a temporary directory unless one was given)."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """mosquitto's log file."""
        return self._workdir / "mosquitto.log" if self._workdir is not None else None

    @property
    def pid(self) -> int | None:
        """The subprocess id while running."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, max_bytes: int = 2000) -> str:
        """The end of mosquitto's log, for error messages."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            return f.read().decode("utf-8", errors="replace").strip()

    def _config(self, port: int) -> str:
        bind = self._bind or "0.0.0.0"
        if self.security is None:
            access = ["allow_anonymous true"]
        else:
            access = mosquitto_security_lines(self.security)
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                # Started by root, mosquitto drops to the `mosquitto` user before reading the password
                # file and key, which may sit in a folder only root can enter; stay the hub's user.
                access.append("user root")
        return "\n".join(
            [
                "# written by ffm_hub.brokers.MosquittoBroker",
                f"listener {port} {bind}",
                *access,
                "persistence false",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "connection_messages true",
                "",
            ]
        )

    def start(self) -> None:
        if self.running:
            return
        binary = self._binary or find_mosquitto()
        if binary is None:
            raise BrokerError(f"mosquitto is not installed: {_INSTALL_HINT}, or use the amqtt broker")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="ffm-mosquitto-"))
            self._own_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        error = ""
        for attempt in range(self._attempts()):
            port = self._pick_port(attempt)
            if _accepts_connections(self.host, port):
                # Something else listens there; our readiness probe would mistake it for mosquitto.
                error = "address already in use (another process listens on that port)"
                continue
            conf = self._workdir / "mosquitto.conf"
            conf.write_text(self._config(port))
            error = self._launch(binary, conf, port)
            if not error:
                _live_mosquittos.add(self)
                log.info("mosquitto (pid %d) listening on %s", self._proc.pid if self._proc else -1, self.url)
                return
            if "address already in use" not in error.lower():
                break
        raise BrokerError(f"mosquitto did not start on {self._bind}:{self._port}: {error}")

    def _launch(self, binary: str, conf: Path, port: int) -> str:
        """Run mosquitto and wait for its port; '' on success, else why it failed (with its log)."""
        assert self.log_path is not None
        self._log_file = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the hub, which stops the broker in order
            )
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"cannot run {binary}: {exc}") from exc
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _accepts_connections(self.host, port) and self._proc.poll() is None:
                return ""
            time.sleep(0.05)
        timed_out = self._proc.poll() is None
        self._stop_process()
        reason = f"not accepting connections after {self.start_timeout:g} s" if timed_out else "exited"
        return f"{reason}; log tail:\n{self.log_tail()}"

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=5.0)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        self._stop_process()
        self.start()

    def stop(self) -> None:
        was_running = self._proc is not None
        self._stop_process()
        if was_running:
            log.info("mosquitto on %s stopped", self.url)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False


class AmqttBroker(ManagedBroker):
    """amqtt 0.12 in this process, on a background thread running its own asyncio event loop.

    Configured with the 0.12 plugin dictionary (``plugins: {dotted.path: options}``): only the anonymous
    authentication plugin, so no $SYS publisher and no packet logging; amqtt's loggers are turned down to
    WARNING unless the application configured them.
    """

    kind = "amqtt"

    def __init__(
        self,
        port: int = 0,
        bind: str = "127.0.0.1",
        start_timeout: float = 10.0,
        security: BrokerSecurity | None = None,
    ) -> None:
        if security is not None and security.client_certs:
            raise ConfigError(
                "amqtt cannot require client certificates or take the username from one (its TLS "
                "listener verifies them only optionally): use Mosquitto, or password authentication"
            )
        super().__init__(port, bind, start_timeout, security)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def _config(self, port: int) -> dict[str, Any]:
        bind = self._bind or "0.0.0.0"
        address = f"[{bind}]" if ":" in bind else bind
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{address}:{port}"}
        security = self.security
        if security is None:
            return {
                "listeners": {"default": listener},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        if security.tls is not None:
            listener.update(
                ssl=True,
                cafile=str(security.tls.ca_file),
                certfile=str(security.tls.cert_file),
                keyfile=str(security.tls.key_file),
            )
        subscribe, publish = amqtt_acls(security.federation, security.devices, security.hub_user)
        return {
            "listeners": {"default": listener},
            "plugins": {
                "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(security.amqtt_password_file)},
                # amqtt 0.12's Config dataclass for this plugin knows `acl` (subscriptions) and
                # `publish_acl` only; its `receive-acl` cannot be set through it.
                "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"acl": subscribe, "publish_acl": publish},
            },
        }

    def start(self) -> None:
        if self.running:
            return
        _quiet_amqtt_loggers()
        error: BaseException | None = None
        for attempt in range(self._attempts()):
            port = self._pick_port(attempt)
            error = self._launch(port)
            if error is None:
                log.info("amqtt broker listening on %s", self.url)
                return
            if not (isinstance(error, OSError) and error.errno == errno.EADDRINUSE):
                break
        raise BrokerError(f"amqtt broker did not start on {self._bind}:{self._port}: {error}") from error

    def _launch(self, port: int) -> BaseException | None:
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, args=(port,), name="ffm-amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.stop()
            return TimeoutError(f"not started within {self.start_timeout:g} s")
        if self._start_error is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
            return self._start_error
        return None

    def _run(self, port: int) -> None:
        try:
            asyncio.run(self._main(port))
        except BaseException as exc:  # surfaced through start(); never let the thread die noisily
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                log.warning("amqtt broker thread ended with %r", exc)

    async def _main(self, port: int) -> None:
        from amqtt.broker import Broker  # imported late: amqtt is heavy and only the fallback

        self._loop = asyncio.get_running_loop()
        # amqtt 0.12 lets some per-client task errors (e.g. "dictionary changed size during iteration" when
        # many clients drop at once) reach asyncio's default handler as tracebacks; the broker keeps
        # serving, so log one warning line instead.
        self._loop.set_exception_handler(
            lambda _loop, context: log.warning("amqtt: %s", context.get("exception") or context.get("message"))
        )
        self._stop_event = asyncio.Event()
        broker = Broker(self._config(port), loop=self._loop)
        try:
            await broker.start()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            self._start_error = cause
            self._ready.set()
            return
        self._ready.set()
        await self._stop_event.wait()
        try:
            await broker.shutdown()
        except Exception as exc:
            log.warning("amqtt broker shutdown failed: %r", exc)

    def stop(self) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        self._thread = None
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=10.0)
        if thread.is_alive():
            log.warning("amqtt broker thread did not stop within 10 s")
        else:
            log.info("amqtt broker on %s stopped", self.url)
        self._loop = None
        self._stop_event = None
        self._ready.clear()


def _quiet_amqtt_loggers() -> None:
    """amqtt logs every connection at INFO and some tracebacks at ERROR; keep only warnings by default."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def start_managed_broker(
    prefer: str = "auto",
    port: int = 0,
    bind: str = "127.0.0.1",
    workdir: Path | None = None,
    security: BrokerSecurity | None = None,
) -> ManagedBroker:
    """Start the broker the hub manages: ``"auto"`` (Mosquitto if installed, else amqtt), ``"mosquitto"``
    or ``"amqtt"``; returns it started. Logs which one was chosen and why. ``security`` (from
    :func:`ffm_hub.security.load_broker_security`) turns on authentication, ACLs and TLS.
    """
    choice = prefer.strip().lower()
    if choice not in ("auto", "mosquitto", "amqtt"):
        raise ConfigError(f"unknown broker kind {prefer!r}: expected auto, mosquitto or amqtt")
    broker: ManagedBroker
    if choice in ("auto", "mosquitto"):
        binary = find_mosquitto()
        if binary is not None:
            log.info("starting mosquitto (%s)%s", binary, " (found on this machine)" if choice == "auto" else "")
            broker = MosquittoBroker(port=port, bind=bind, workdir=workdir, binary=binary, security=security)
            broker.start()
            return broker
        if choice == "mosquitto":
            raise BrokerError(f"mosquitto was requested but is not installed: {_INSTALL_HINT}")
        log.warning(
            "mosquitto is not installed, falling back to the in-process amqtt broker (fine for a demo; "
            "slower, and no Last Will for silent clients); for real use %s",
            _INSTALL_HINT,
        )
    else:
        log.info("starting the in-process amqtt broker (requested)")
    broker = AmqttBroker(port=port, bind=bind, security=security)
    broker.start()
    return broker
