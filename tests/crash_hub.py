"""A hub process for the crash tests: plain arrays for a model, a real broker, an SQLite store.

Run as ``python tests/crash_hub.py HOST PORT STATE_DIR TAU [OPTIMIZER]``; ``FFM_CRASH_AT`` makes it die like ``kill -9``
at a chosen point (see ffm_hub.faults). SIGTERM stops it cleanly.
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np

from ffm_edge.transport import MqttTransport
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

STATE = {"lora_A": np.zeros((2, 3), np.float32), "head": np.ones(2, np.float32)}


def main() -> None:
    host, port, state_dir, tau = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    optimizer = sys.argv[5] if len(sys.argv) > 5 else "fedavg"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    transport = MqttTransport(host, port, client_id="crash-hub")
    transport.connect(timeout=30)
    store = SqliteStore(state_dir)
    hub = Hub(
        HubSettings(federation="crash", tau=tau, staleness="constant", server_optimizer=optimizer, server_momentum=0.5),
        transport,
        store,
        initial_state=lambda: STATE,
    )
    hub.start()
    stop.wait()
    hub.stop()
    transport.close()
    store.close()


if __name__ == "__main__":
    main()
