"""The processes the fault scenarios kill, and the plain-array model they share with the in-process ones.

A fault scenario needs real updates (real tensors, real frames, the real edge client and hub) but no
training: :class:`ArrayTrainer` is a :class:`~ffm_edge.runtime.Trainer` over a few float32 arrays whose
"training" adds a seeded random step, and :class:`ArrayEdgeClient` is the real
:class:`~ffm_edge.client.EdgeClient` (manifest, pull, on-disk outbox, chunked upload, resend until a
receipt) driving it.

Run as a module, it is one of the processes a scenario SIGKILLs:

    python -m ffm_hub.reliability.crash_runner hub --broker mqtt://127.0.0.1:1883 --state DIR --tau 2
    python -m ffm_hub.reliability.crash_runner edge --broker URL --state DIR --device d1 --federation F \
        --die-at upload:4
    python -m ffm_hub.reliability.crash_runner resume --broker URL --state DIR --device d1 --federation F

``hub`` serves the plain-array model with an SQLite store until SIGTERM; ``FFM_CRASH_AT`` makes it die
at a chosen point (:mod:`ffm_hub.faults`). ``edge`` trains one update on the current version, keeps it
in its outbox, prints ``PREPARED <update id>``, waits for a line on stdin (the scenario stops the hub
first, or not), then sends it and dies like ``kill -9`` at ``--die-at``. ``resume`` is the same device
restarted: it sends what its outbox holds and prints ``RECEIPT <update id> <duplicate>`` per receipt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.client import EdgeClient, ProgressEvent
from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.runtime import ProgressCallback, TrainReport
from ffm_edge.transport import MqttTransport, parse_broker_url
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.service import wait_for
from ffm_hub.store import SqliteStore

__all__ = [
    "CRASH_FEDERATION",
    "CRASH_STATE",
    "UPLOAD_STATE",
    "ArrayEdgeClient",
    "ArrayTrainer",
    "crash_hub_settings",
    "edge_command",
    "start_hub_process",
]

#: The federation of the hub process.
CRASH_FEDERATION = "crash"

#: The hub process's global state: two small tensors (updates may carry either or both).
CRASH_STATE: dict[str, np.ndarray] = {"lora_A": np.zeros((2, 3), np.float32), "head": np.ones(2, np.float32)}

#: A few small arrays (about 8.7 KB as fp32): chunked at 1 KiB an update is nine MQTT messages, so a
#: fault lands in the middle of an upload.
UPLOAD_STATE: dict[str, np.ndarray] = {
    "lora_A": np.zeros((16, 64), np.float32),
    "lora_B": np.zeros((64, 16), np.float32),
    "head": np.zeros((2, 64), np.float32),
}


def crash_hub_settings(tau: int, optimizer: str = "fedavg", federation: str = CRASH_FEDERATION) -> HubSettings:
    """The hub process's settings: every update weighs its sample count whatever its staleness (the
    updates a crash test resends are built on version 0 while the versions move on)."""
    return HubSettings(
        federation=federation, tau=tau, staleness="constant", server_optimizer=optimizer, server_momentum=0.5
    )


# -- the plain-array model --------------------------------------------------------------------------
class _ArrayStrategy:
    """The strategy side of :class:`ArrayTrainer`: a name on the wire, the delta sent as it is."""

    name = "lora"

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(delta)


class ArrayTrainer:
    """A :class:`~ffm_edge.runtime.Trainer` over plain float32 arrays: ``train`` adds a step drawn from
    ``seed`` to every tensor, so updates are real, repeatable tensors without a model or torch."""

    def __init__(self, state: Mapping[str, np.ndarray], *, step: float = 0.01) -> None:
        self.strategy = _ArrayStrategy()
        self.batch_size = 1
        self.learning_rate = step
        self._state = {name: np.array(value, np.float32) for name, value in state.items()}

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._state)

    def num_trainable(self) -> int:
        return sum(int(value.size) for value in self._state.values())

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._state.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        if strict and set(state) != set(self._state):
            raise ConfigError(f"tensors {sorted(state)} do not match {self.tensor_names}")
        self._state.update({name: np.array(value, np.float32) for name, value in state.items()})

    def train(
        self,
        data: LabeledData,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        progress: ProgressCallback | None = None,
        seed: int | None = None,
    ) -> TrainReport:
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        for name in self.tensor_names:  # a fixed order: the same seed gives the same step
            self._state[name] += rng.normal(0.0, self.learning_rate, self._state[name].shape).astype(np.float32)
        if progress is not None:
            progress(1, 1, 0.0)
        return TrainReport(len(data), 1, epochs, 0.0, 0.0, 0.0, time.perf_counter() - started)

    def predict(self, data: LabeledData, *, batch_size: int = 64) -> np.ndarray:
        raise NotImplementedError("plain arrays are not a model: there is nothing to predict")

    def loss(self, data: LabeledData, *, batch_size: int = 64) -> float:
        raise NotImplementedError("plain arrays are not a model: there is no loss")

    def evaluate(self, data: LabeledData, *, batch_size: int = 64) -> dict[str, float]:
        raise NotImplementedError("plain arrays are not a model: there is nothing to evaluate")


class ArrayEdgeClient(EdgeClient):
    """The real :class:`EdgeClient` with an :class:`ArrayTrainer`: every protocol path (manifest, pull,
    outbox, chunked upload, resend until the receipt) is the SDK's own; only the training is arrays.

    ``num_samples`` sets the update's n_k (the size of the local data). The model spec is only a name
    here: nothing is loaded. Updates go out as fp32, so the hub's mean can be checked exactly.
    """

    def __init__(self, state: Mapping[str, np.ndarray], *, device_id: str, num_samples: int = 1, **kwargs: Any) -> None:
        data = LabeledData(get_task("sst2"), [("x", None)] * num_samples, np.zeros(num_samples, np.int64))
        kwargs.setdefault("codec", "fp32")
        kwargs.setdefault("heartbeat_interval", 0)
        super().__init__("minilm-l6-v2", data, device_id=device_id, trainer=ArrayTrainer(state), **kwargs)


# -- the hub process --------------------------------------------------------------------------------
def start_hub_process(
    broker_url: str,
    state_dir: Path,
    tau: int,
    *,
    crash_at: str | None = None,
    optimizer: str = "fedavg",
    federation: str = CRASH_FEDERATION,
) -> subprocess.Popen[bytes]:
    """Start the hub process on ``state_dir``; ``crash_at`` (``point[:n]``) is its ``FFM_CRASH_AT``."""
    env = {k: v for k, v in os.environ.items() if k != "FFM_CRASH_AT"}
    if crash_at:
        env["FFM_CRASH_AT"] = crash_at
    command = [*_module_command("hub"), "--broker", broker_url, "--state", str(state_dir), "--tau", str(tau)]
    command += ["--optimizer", optimizer, "--federation", federation]
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "hub.log").open("ab") as log_file:  # every start of this hub, for a failed trial
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_file)


def edge_command(action: str, broker_url: str, state_dir: Path, device: str, federation: str) -> list[str]:
    """The command line of an ``edge`` or ``resume`` process (add ``--die-at`` for ``edge``)."""
    return [*_module_command(action), "--broker", broker_url, "--state", str(state_dir), "--device", device,
            "--federation", federation]  # fmt: skip


def _module_command(action: str) -> list[str]:
    return [sys.executable, "-m", __name__ if __name__ != "__main__" else "ffm_hub.reliability.crash_runner", action]


def _run_hub(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    address = parse_broker_url(args.broker)
    transport = MqttTransport(address.host, address.port, client_id=f"crash-hub-{os.getpid()}")
    transport.connect(timeout=30)
    store = SqliteStore(args.state)
    settings = crash_hub_settings(args.tau, args.optimizer, args.federation)
    hub = Hub(settings, transport, store, initial_state=lambda: CRASH_STATE)
    hub.start()
    wait_for(stop)
    hub.stop()
    transport.close()
    store.close()
    return 0


# -- the edge processes -----------------------------------------------------------------------------
def _die_at(spec: str | None) -> Callable[[ProgressEvent], None] | None:
    """An ``on_progress`` that SIGKILLs this process at ``upload:K`` (the K-th chunk sent) or ``wait``
    (every chunk sent, no receipt yet)."""
    if not spec:
        return None
    stage, _, count = spec.partition(":")
    if stage not in ("upload", "wait"):
        raise ConfigError(f"--die-at must be upload:K or wait, got {spec!r}")
    chunk = int(count or 1)

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == stage and (stage == "wait" or event.done >= chunk):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_progress


def _edge_client(args: argparse.Namespace, **kwargs: Any) -> ArrayEdgeClient:
    return ArrayEdgeClient(
        UPLOAD_STATE,
        device_id=args.device,
        federation=args.federation,
        broker=args.broker,
        state_dir=args.state,
        chunk_size=1024,
        receipt_timeout=3.0,
        pull_timeout=10.0,
        version_timeout=30.0,
        **kwargs,
    )


def _run_edge(args: argparse.Namespace) -> int:
    client = _edge_client(args, on_progress=_die_at(args.die_at))
    with client:
        prepared = client.prepare_update()
        print(f"PREPARED {prepared.meta.update_id}", flush=True)
        sys.stdin.readline()  # the scenario decides whether the hub answers, then lets us send
        client.send_update(prepared)
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    with _edge_client(args) as client:
        for receipt in client.send_pending():
            print(f"RECEIPT {receipt.update_id} {int(receipt.duplicate)}", flush=True)
        return 0 if not client.outbox.pending() else 1


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    common.add_argument("--state", type=Path, required=True, help="the state folder (the hub's store, the outbox)")
    parser = argparse.ArgumentParser(prog="crash_runner", description=(__doc__ or "").split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    hub = actions.add_parser("hub", parents=[common], help="a hub on the plain-array model, until SIGTERM")
    hub.add_argument("--tau", type=int, required=True)
    hub.add_argument("--optimizer", default="fedavg")
    hub.add_argument("--federation", default=CRASH_FEDERATION)
    edge = actions.add_parser("edge", parents=[common], help="prepare one update, send it, die at --die-at")
    resume = actions.add_parser("resume", parents=[common], help="send what the outbox holds")
    for device in (edge, resume):
        device.add_argument("--device", required=True)
        device.add_argument("--federation", required=True)
    edge.add_argument("--die-at", default=None, help="upload:K (after the K-th chunk) or wait (after the last)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    runners = {"hub": _run_hub, "edge": _run_edge, "resume": _run_resume}
    return runners[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
