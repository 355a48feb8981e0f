"""The ORT runtime on an image model: EfficientNet-Lite0 on scikit-learn's digits, without torch on the device.

The exported graph takes raw pixels (float32 (N, H, W, 3) in 0..255) and resizes and normalizes them
itself, so a device needs only numpy. Checked: what the artifacts hold, that the ORT eval graph computes the
torch model's logits, that ORT training lowers the loss and changes only the strategy's tensors, that a
device process with torch blocked trains from them, and that a device without torch fetches the artifacts
from a hub over both real brokers, trains a round and the hub aggregates it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ort_helpers import device_env, require_ort

from ffm_edge.data import LabeledData, get_task, load_split
from ffm_edge.errors import ConfigError
from ffm_edge.planner import plan_training
from ffm_edge.spec import load_model_spec
from ffm_hub.artifacts import ArtifactService
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

pytestmark = pytest.mark.slow

SPEC = "efficientnet-lite0"
TASK = get_task("digits")


def _digits(n: int, seed: int = 0) -> LabeledData:
    return load_split("digits", "train", limit=n, seed=seed)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Artifacts for head and lora, built once (5-15 s each)."""
    require_ort()
    from ffm_edge.ort.artifacts import build_artifacts

    root = tmp_path_factory.mktemp("ort-vision")
    return {s: (build_artifacts(SPEC, TASK, s, root / s, dropout=False), root / s)[1] for s in ("head", "lora")}


@pytest.mark.parametrize("strategy", ["head", "lora"])
def test_artifacts_take_pixels_and_compute_the_torch_logits(artifacts: dict[str, Path], strategy: str) -> None:
    from ffm_edge.ort.manifest import PIXELS_INPUT, load_manifest
    from ffm_edge.ort.trainer import OrtTrainer
    from ffm_edge.trainer import TorchTrainer

    folder = artifacts[strategy]
    manifest = load_manifest(folder)
    assert manifest.inputs == (PIXELS_INPUT,) and manifest.tokenizer == {} and manifest.extra["image_size"] == 96
    assert not (folder / "tokenizer").exists()
    torch_trainer = TorchTrainer(load_model_spec(SPEC), TASK, strategy, seed=0)
    ort = OrtTrainer(folder, TASK, spec=SPEC, strategy=strategy)
    assert ort.tensor_names == torch_trainer.tensor_names
    for name, value in ort.trainable_state().items():  # the artifacts start where a fresh torch device does
        np.testing.assert_array_equal(value, torch_trainer.trainable_state()[name])
    data = _digits(24)  # 8x8 images: the graph resizes them to 96x96, as the torch encoder does
    ort_pred = ort.predict(data)
    torch_pred = torch_trainer.predict(data)
    np.testing.assert_array_equal(ort_pred, torch_pred)
    assert ort.evaluate(data)["accuracy"] == pytest.approx(torch_trainer.evaluate(data)["accuracy"])
    assert ort.loss(data) == pytest.approx(torch_trainer.loss(data), rel=1e-4)


@pytest.mark.parametrize("strategy", ["head", "lora"])
def test_ort_training_lowers_the_loss_and_moves_only_the_strategy_tensors(
    artifacts: dict[str, Path], strategy: str
) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    ort = OrtTrainer(artifacts[strategy], TASK, spec=SPEC, strategy=strategy, threads=1)
    data = _digits(64)
    before_state, before_loss = ort.trainable_state(), ort.loss(data)
    report = ort.train(data, epochs=3, seed=0)
    after = ort.trainable_state()
    assert report.steps == 6 and ort.loss(data) < before_loss, (before_loss, ort.loss(data))
    assert set(after) == set(before_state) and all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(after[k], before_state[k]) for k in after)


def test_image_artifacts_refuse_a_text_task(artifacts: dict[str, Path]) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    text_task = dataclasses.replace(get_task("sst2"), num_labels=10)  # labels match, modality does not
    with pytest.raises(ConfigError, match="for an image model; task sst2 is text"):
        OrtTrainer(artifacts["head"], text_task, spec=SPEC)


def test_the_planner_offers_the_ort_runtime_for_an_image_model() -> None:
    spec = load_model_spec(SPEC)
    plan = plan_training(spec, 2 << 30, batch_size=32, seq_len=spec.max_length, num_labels=10, runtimes=("ort",))
    assert plan.choice is not None and plan.choice.runtime == "ort" and plan.choice.strategy in ("lora", "head")


def _run_without_torch(script: str, argv: list[str], tmp_path: Path) -> dict[str, Any]:
    """Run a device script in a process where ``import torch`` fails; return its ``RESULT`` line's JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        env=device_env(tmp_path, block_torch=True),
        timeout=400,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return dict(json.loads(lines[-1][len("RESULT ") :]))


_DEVICE = """
import json, sys
import numpy as np
from ffm_edge.data import get_task, load_split
from ffm_edge.ort.trainer import OrtTrainer
trainer = OrtTrainer(sys.argv[1], get_task("digits"), spec="efficientnet-lite0", threads=1)
data = load_split("digits", "train", limit=32, seed=1)
before = trainer.loss(data)
trainer.train(data, epochs=2, seed=0)
print("RESULT " + json.dumps({"before": before, "after": trainer.loss(data),
      "torch": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}))
"""


def test_a_device_without_torch_trains_from_image_artifacts(artifacts: dict[str, Path], tmp_path: Path) -> None:
    result = _run_without_torch(_DEVICE, [str(artifacts["lora"])], tmp_path)
    assert result["torch"] is False and result["after"] < result["before"]


_FETCHING_DEVICE = """
import json, sys
from ffm_edge.client import EdgeClient
from ffm_edge.data import load_split
from ffm_edge.ort.fetch import fetch_artifacts_from_hub
from ffm_edge.spec import load_model_spec

url, state, federation = sys.argv[1:4]
out = state + "/ort-artifacts"
fetch_artifacts_from_hub(url, out, federation=federation, device_id="cam-1", model="efficientnet-lite0",
                         task="digits", strategy="head", idle_timeout=60)
data = load_split("digits", "train", limit=32, seed=2)
client = EdgeClient(load_model_spec("efficientnet-lite0"), data, device_id="cam-1", federation=federation,
                    broker=url, runtime="ort", strategy="head", ort_artifacts=out, batch_size=16, state_dir=state,
                    threads=1,
                    heartbeat_interval=0)
with client:
    result = client.run_round()
print("RESULT " + json.dumps({"runtime": client.runtime, "update_id": result.update_id,
      "torch": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}))
"""


def test_a_camera_without_torch_fetches_image_artifacts_from_the_hub_and_federates(
    mqtt_broker: ManagedBroker, tmp_path: Path
) -> None:
    require_ort()
    from ffm_edge.trainer import TorchTrainer
    from ffm_edge.transport import MqttTransport
    from ffm_edge.wire import decode_global, decode_update

    federation = "cams-" + tmp_path.name[-8:]
    service = ArtifactService(load_model_spec(SPEC), "digits", tmp_path / "cache", strategies=("head",))
    initial = TorchTrainer(load_model_spec(SPEC), TASK, "head", seed=0).trainable_state()
    transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    transport.connect()
    store = SqliteStore(tmp_path / "hub")
    hub = Hub(
        HubSettings(federation=federation, model=SPEC, strategy="head", tau=1),
        transport,
        store,
        initial_state=lambda: initial,
        artifacts=service,
    )
    hub.start()
    try:
        result = _run_without_torch(_FETCHING_DEVICE, [mqtt_broker.url, str(tmp_path / "cam"), federation], tmp_path)
        assert hub.wait_for_version(1, timeout=60) and hub.wait_idle(30)
        assert result["torch"] is False and result["runtime"] == "ort" and service.builds == 1
        _, before = decode_global(store.load_version(0))
        _, after = decode_global(store.load_version(1))
        _, delta = decode_update(store.load_update(result["update_id"]))
        assert set(delta) == set(initial) == {"_fc.weight", "_fc.bias"}
        for name in delta:  # tau = 1, FedAvg with eta = 1: the new version is the old plus the camera's delta
            np.testing.assert_allclose(after[name], before[name] + delta[name], rtol=1e-6, atol=1e-7)
    finally:
        hub.stop()
        transport.close()
        store.close()
