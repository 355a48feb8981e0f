"""MQTT 3.1.1 transport on paho-mqtt 2.x.

paho does the protocol work (network thread, keep-alive, reconnect back-off, QoS 1 retransmission of
unacknowledged messages after a reconnect, ``wait_for_publish``); this module adds what FFM needs on top:
subscriptions that are made again on every reconnect (no broker is trusted to keep a session), an
"online" presence message published once those subscriptions are in place, an "offline" message on a
clean close (the Last Will only fires on a crash), and paho's error codes turned into
:class:`~ffm_edge.errors.TransportError` with a readable message.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ffm_edge.errors import AuthError, ConfigError, TransportError
from ffm_edge.transport.base import MessageHandler, PresenceLike, Transport

__all__ = ["DEFAULT_PORT", "DEFAULT_TLS_PORT", "BrokerAddress", "MqttTransport", "TlsOptions", "parse_broker_url"]

log = logging.getLogger("ffm.transport")

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
_PLAIN_SCHEMES = ("mqtt", "tcp")
_TLS_SCHEMES = ("mqtts",)


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens, as parsed from a URL."""

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False

    @property
    def url(self) -> str:
        """The canonical URL, e.g. ``mqtt://127.0.0.1:1883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host:port``, ``tcp://host:port`` or bare ``host[:port]`` (default port 1883).

    ``mqtts://`` means TLS (default port 8883). Anything else raises ConfigError.
    """
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ConfigError("empty broker URL: expected mqtt://HOST:PORT")
    if "://" not in text:
        text = f"mqtt://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _PLAIN_SCHEMES + _TLS_SCHEMES:
        raise ConfigError(f"unsupported broker URL scheme {scheme!r} in {url!r}: expected mqtt://HOST:PORT")
    tls = scheme in _TLS_SCHEMES
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid port in broker URL {url!r}") from exc
    if port is None:
        port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"invalid port {port} in broker URL {url!r}")
    host = parts.hostname
    if not host:
        raise ConfigError(f"no host in broker URL {url!r}: expected mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r} must not have a path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"broker URL {url!r} must not carry credentials; pass username/password instead")
    return BrokerAddress(host, port, tls)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for :class:`MqttTransport`, mapped onto paho's ``tls_set``: the CA that signed the broker's
    certificate (None: the system's CAs), and a client certificate and key for brokers that require one.
    The broker's hostname is checked unless ``insecure_hostname`` (for tests against an IP only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_hostname: bool = False


# CONNACK refusals that no retry can fix: MQTT 3.1.1 return codes 4 and 5.
_AUTH_REFUSALS = ("bad user name or password", "not authorized")

_paho_log = logging.getLogger("ffm.transport.paho")


def _on_paho_log(client: paho.Client, userdata: object, level: int, message: str) -> None:
    """paho reports every failed reconnect attempt as an error; we log connection state ourselves,
    so its messages go to DEBUG, except exceptions caught in callbacks, which are our bugs."""
    if message.startswith("Caught exception"):
        _paho_log.error(message)
    else:
        _paho_log.debug(message)


@dataclass
class _SubWaiter:
    """A caller of :meth:`MqttTransport.subscribe` waiting for the broker's SUBACK."""

    event: threading.Event = field(default_factory=threading.Event)
    refused: bool = False


class MqttTransport(Transport):
    """A :class:`Transport` over MQTT 3.1.1 (paho-mqtt 2.x, network thread started by ``loop_start``).

    ``connected`` becomes true only after the CONNACK *and* the SUBACK of the re-subscription, so a
    publisher that waited for it knows this client's handlers receive what is sent next. The online
    presence is published at that same moment. ``max_inflight`` bounds the unacknowledged QoS 1 messages
    on the wire (more are queued by paho); with 4 MiB chunks the default keeps ~80 MiB in flight.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        client_id: str = "",
        *,
        keepalive: int = 30,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        username: str | None = None,
        password: str | None = None,
        will: PresenceLike = None,
        online: PresenceLike = None,
        clean_session: bool = True,
        max_inflight: int = 20,
        tls: bool | TlsOptions = False,
    ) -> None:
        super().__init__(will=will, online=online)
        if not host:
            raise ConfigError("MqttTransport needs a broker host")
        if not 0 < port < 65536:
            raise ConfigError(f"invalid MQTT port {port}")
        if keepalive < 1:
            raise ConfigError(f"keepalive must be at least 1 second, got {keepalive}")
        if not 0 < reconnect_min_delay <= reconnect_max_delay:
            raise ConfigError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if max_inflight < 1:
            raise ConfigError(f"max_inflight must be at least 1, got {max_inflight}")
        self.host = host
        self.port = port
        self.client_id = client_id or f"ffm-{uuid.uuid4().hex[:12]}"
        self.keepalive = keepalive
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.on_log = _on_paho_log
        if username is not None:
            client.username_pw_set(username, password)
        self.tls = TlsOptions() if tls is True else (tls or None)
        if self.tls is not None:
            _set_tls(client, self.tls)
        client.max_inflight_messages_set(max_inflight)
        # paho annotates the delays as int but does float arithmetic with them; sub-second delays work.
        client.reconnect_delay_set(reconnect_min_delay, reconnect_max_delay)  # type: ignore[arg-type]
        will_msg = self.presence.will
        if will_msg is not None:
            client.will_set(will_msg.topic, will_msg.payload, qos=1, retain=will_msg.retain)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._started = False
        self._ever_ready = False
        self._session_up = False
        self._resub: tuple[int, list[str]] | None = None
        self._sub_waiters: dict[int, _SubWaiter] = {}
        self._net_thread: threading.Thread | None = None
        self._last_error = "no connection attempt yet"
        self._fatal: str | None = None
        self._auth_refused = False

    @classmethod
    def from_url(cls, url: str, client_id: str = "", **kwargs: object) -> MqttTransport:
        """Build from a broker URL (see :func:`parse_broker_url`); ``kwargs`` go to the constructor.

        ``mqtts://`` turns TLS on with the system's CAs unless ``tls=TlsOptions(...)`` says more.
        """
        address = parse_broker_url(url)
        tls = kwargs.pop("tls", None) or address.tls
        return cls(address.host, address.port, client_id, tls=tls, **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"MqttTransport({self.url!r}, client_id={self.client_id!r}, connected={self.connected})"

    @property
    def url(self) -> str:
        """The broker's URL."""
        return BrokerAddress(self.host, self.port, self.tls is not None).url

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self._closed.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and not self._closed.is_set()

    def _on_net_thread(self) -> bool:
        return threading.current_thread() is self._net_thread

    def _where(self) -> str:
        return f"MQTT broker at {self.host}:{self.port}"

    # -- connect / close ------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        deadline = self._deadline(timeout)
        first = False
        with self._lock:
            if self._closed.is_set():
                raise TransportError(f"transport {self.client_id} is closed")
            if not self._started:
                first = True
                self._tcp_connect(deadline, timeout)
                self._started = True
                self._client.loop_start()
        while not self._ready.is_set():
            fatal = self._fatal
            remaining = deadline - time.monotonic()
            if fatal is not None or remaining <= 0:
                auth_refused = self._auth_refused
                if first:  # leave no thread behind, and let a later connect() start afresh
                    self._shutdown()
                    with self._lock:
                        self._started = False
                        self._fatal = None
                        self._auth_refused = False
                if fatal is not None:
                    raise (AuthError if auth_refused else TransportError)(fatal)
                raise TransportError(
                    f"{self._where()} did not complete the MQTT handshake within {timeout:g} s ({self._last_error})"
                )
            if self._closed.is_set():
                raise TransportError(f"transport {self.client_id} was closed while connecting")
            self._ready.wait(min(0.1, remaining))

    def _tcp_connect(self, deadline: float, timeout: float) -> None:
        """Open the socket ourselves the first time, so refused/unresolvable hosts give a clear error."""
        delay = self.reconnect_min_delay
        while True:
            try:
                self._client.connect(self.host, self.port, self.keepalive)
                return
            except socket.gaierror as exc:
                raise TransportError(f"cannot resolve MQTT broker host {self.host!r}: {exc}") from exc
            except ssl.SSLError as exc:  # a certificate problem: retrying cannot fix it
                raise TransportError(f"TLS handshake with {self._where()} failed: {exc}") from exc
            except (OSError, ValueError) as exc:
                self._last_error = str(exc)
                remaining = deadline - time.monotonic()
                if isinstance(exc, ValueError) or remaining <= 0:
                    raise TransportError(f"cannot connect to {self._where()} within {timeout:g} s: {exc}") from exc
                log.debug("connect to %s failed (%s); retrying", self._where(), exc)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, self.reconnect_max_delay)

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            started = self._started
        will = self.presence.will
        if started and will is not None and self._ready.is_set() and not self._on_net_thread():
            try:
                info = self._client.publish(will.topic, will.payload, qos=1, retain=will.retain)
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline presence on close: %s", exc)
        self._closed.set()
        self._shutdown()
        log.info("closed connection %s to %s", self.client_id, self._where())

    def abort(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            started = self._started
        if not started:
            return
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            # FIN without DISCONNECT: to the broker this is a client that died, so it sends the will.
            # paho then sees the dead socket and calls _on_disconnect, which stops the reconnects.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                self._client.disconnect()
        else:
            self._client.disconnect()
        if not self._on_net_thread():
            self._client.loop_stop()
        self._ready.clear()
        log.info("aborted connection %s to %s", self.client_id, self._where())

    def _shutdown(self) -> None:
        """Stop paho's network thread (its DISCONNECT also wakes its select loop)."""
        self._client.disconnect()
        if not self._on_net_thread():
            self._client.loop_stop()
        self._ready.clear()

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._net_thread = threading.current_thread()
        if reason_code.is_failure:
            message = f"{self._where()} refused the connection: {reason_code}"
            self._last_error = message
            if not self._ever_ready:
                self._fatal = message
                if str(reason_code).lower() in _AUTH_REFUSALS:
                    self._auth_refused = True
            log.error(message)
            return
        with self._lock:
            self._session_up = True
            filters = self.subscriptions
            if filters:
                rc, mid = client.subscribe(list(filters.items()))
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._resub = (mid, list(filters))
                else:
                    log.warning("re-subscribing failed (%s); waiting for the next reconnect", paho.error_string(rc))
                return
        self._become_ready()

    def _become_ready(self) -> None:
        online = self.presence.online
        if online is not None:
            self._client.publish(online.topic, online.payload, qos=1, retain=online.retain)
        with self._lock:
            if not self._session_up:
                return
            self._ready.set()
            reconnect = self._ever_ready
            self._ever_ready = True
            self._last_error = ""
        log.info("%s %s to %s", self.client_id, "reconnected" if reconnect else "connected", self._where())
        self._notify_connection(True)

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        self._last_error = "connection attempt failed"
        log.debug("reconnect of %s to %s failed; retrying", self.client_id, self._where())

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._net_thread = threading.current_thread()
        with self._lock:
            was_ready = self._ready.is_set()
            self._ready.clear()
            self._session_up = False
            self._resub = None
            waiters, self._sub_waiters = self._sub_waiters, {}
        for waiter in waiters.values():
            waiter.event.set()  # the filter stays remembered and is made again on reconnect
        if self._closed.is_set():
            client.disconnect()  # after abort(): stop paho from reconnecting
        else:
            self._last_error = f"connection lost: {reason_code}"
            if was_ready:
                log.warning(
                    "%s lost its connection to %s (%s); reconnecting",
                    self.client_id,
                    self._where(),
                    reason_code,
                )
        if was_ready:
            self._notify_connection(False)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            resub = self._resub
            if resub is not None and resub[0] == mid:
                self._resub = None
                waiter = None
            else:
                resub = None
                waiter = self._sub_waiters.pop(mid, None)
        if resub is not None:
            for topic_filter, code in zip(resub[1], reason_codes, strict=False):
                if code.is_failure:
                    log.error("%s refused the subscription to %s (%s)", self._where(), topic_filter, code)
            self._become_ready()
        elif waiter is not None:
            waiter.refused = any(code.is_failure for code in reason_codes)
            waiter.event.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self._net_thread = threading.current_thread()
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropping a message whose topic is not UTF-8: %r", message._topic)
            return
        payload = message.payload
        self._dispatch(topic, payload if isinstance(payload, bytes) else bytes(payload))

    # -- messages ----------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        data = self._check_publish_args(topic, payload, qos)
        deadline = self._deadline(timeout)
        on_net = self._on_net_thread()
        while True:
            if self._closed.is_set():
                raise TransportError(f"cannot publish to {topic}: transport {self.client_id} is closed")
            if not self._started:
                raise TransportError(f"cannot publish to {topic}: call connect() first")
            if self._ready.is_set() or on_net:
                try:
                    info = self._client.publish(topic, data, qos=qos, retain=retain)
                except ValueError as exc:
                    raise TransportError(f"cannot publish to {topic}: {exc}") from exc
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
                    # paho keeps QoS>0 messages queued and sends them after the reconnect; "no
                    # connection" only means "not sent yet", so wait for the PUBACK as usual.
                    info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                    break
                if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
                    raise TransportError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(
                    f"cannot publish to {topic}: not connected to {self._where()} within {timeout:g} s "
                    f"({self._last_error})"
                )
            self._ready.wait(min(0.1, remaining))
        if qos == 0 or on_net:
            return
        while not info.is_published():
            if self._closed.is_set():
                raise TransportError(f"transport {self.client_id} closed before the broker acknowledged {topic}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(
                    f"no acknowledgement from {self._where()} for {topic} within {timeout:g} s "
                    f"({self._last_error or 'connected'}); it may still be delivered later"
                )
            try:
                info.wait_for_publish(min(0.25, remaining))
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"cannot publish to {topic}: {exc}") from exc

    def subscribe(
        self,
        topic_filter: str,
        handler: MessageHandler,
        *,
        qos: int = 1,
        timeout: float = 10.0,
    ) -> None:
        self._remember(topic_filter, handler, qos)
        with self._lock:
            if not self._session_up:
                return  # made by _on_connect on the next (re)connect
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None or self._on_net_thread():
                return
            waiter = _SubWaiter()
            self._sub_waiters[mid] = waiter
        if not waiter.event.wait(timeout):
            raise TransportError(f"no SUBACK from {self._where()} for {topic_filter} within {timeout:g} s")
        if waiter.refused:
            self._forget(topic_filter)
            raise TransportError(f"{self._where()} refused the subscription to {topic_filter}")

    def unsubscribe(self, topic_filter: str) -> None:
        self._forget(topic_filter)
        with self._lock:
            if self._session_up:
                self._client.unsubscribe(topic_filter)


def _set_tls(client: paho.Client, tls: TlsOptions) -> None:
    """paho's ``tls_set`` (TLS 1.2+, the broker's certificate verified); unreadable files are ConfigError."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("a TLS client certificate needs both cert_file and key_file")
    try:
        client.tls_set(
            ca_certs=tls.ca_file,
            certfile=tls.cert_file,
            keyfile=tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot set up TLS ({tls}): {exc}") from exc
    client.tls_insecure_set(tls.insecure_hostname)
