"""The torch-free ORT runtime: artifacts built from a spec and strategy, trained on without torch, in
numerical agreement with TorchTrainer, producing updates the wire cannot tell apart; and its errors.

Artifacts are built once per session (tests/ort_helpers.py) for all-MiniLM-L6-v2 with 32-token sequences.
Everything skips, with the reason, where onnxruntime-training is not installed (CI installs the extra).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ort_helpers import GLOBAL_VERSION, built_artifacts, device_env, require_ort, sentiment_data, short_spec

from ffm_edge.data import get_task
from ffm_edge.errors import ConfigError, OrtArtifactError, OrtUnavailableError
from ffm_edge.ort import compat
from ffm_edge.ort.compat import check_onnx_version
from ffm_edge.ort.manifest import MANIFEST_NAME, load_manifest


@pytest.fixture(scope="module")
def art_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_ort()
    return tmp_path_factory.mktemp("ort-artifacts")


@pytest.fixture(scope="module")
def lora_dir(art_root: Path) -> Path:
    return built_artifacts(art_root, "lora", dropout=False, from_frame=True)


# -- constraints: clear errors ---------------------------------------------------------------------------
def test_onnx_too_new_is_a_clear_error() -> None:
    assert check_onnx_version("1.17.0") == "1.17.0"
    for version in ("1.18.0", "1.19.1", "2.0"):
        with pytest.raises(OrtUnavailableError, match=r"onnx<1\.18"):
            check_onnx_version(version)


def test_builder_refuses_a_too_new_onnx_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = compat.dist_version
    monkeypatch.setattr(compat, "dist_version", lambda *names: "1.18.0" if names == ("onnx",) else real(*names))
    from ffm_edge.ort.artifacts import build_artifacts

    with pytest.raises(OrtUnavailableError, match="IR version"):
        build_artifacts(short_spec(), "sst2", "lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_builder_rejects_what_the_ort_runtime_does_not_train(art_root: Path, tmp_path: Path) -> None:
    from ffm_edge.ort.artifacts import build_artifacts

    with pytest.raises(ConfigError, match="full_q8"):
        build_artifacts(short_spec(), "sst2", "full_q8", tmp_path / "a")
    with pytest.raises(ConfigError, match="prompt' needs a text transformers model"):  # images: lora and head
        build_artifacts("efficientnet-lite0", "digits", "prompt", tmp_path / "b")


def test_missing_artifacts_say_how_to_build_them(tmp_path: Path) -> None:
    require_ort()
    from ffm_edge.ort.trainer import OrtTrainer

    with pytest.raises(OrtArtifactError, match="ffm-edge ort-build"):
        OrtTrainer(tmp_path / "nowhere", get_task("sst2"))


def test_mismatched_artifacts_are_typed_errors(lora_dir: Path, tmp_path: Path) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    sst2 = get_task("sst2")
    with pytest.raises(OrtArtifactError, match="strategy 'lora', expected 'prompt'"):
        OrtTrainer(lora_dir, sst2, strategy="prompt")
    with pytest.raises(OrtArtifactError, match="model spec"):
        OrtTrainer(lora_dir, sst2, spec="smollm2-135m")
    with pytest.raises(OrtArtifactError, match="2 labels, expected 3"):
        OrtTrainer(lora_dir, get_task("mnli"))
    manifest = load_manifest(lora_dir)
    names = {t.name: t.shape for t in manifest.tensors}
    renamed = {("x." + k if k.startswith("classifier") else k): v for k, v in names.items()}
    with pytest.raises(OrtArtifactError, match="tensor names differ"):
        manifest.check(tensors=renamed)
    reshaped = {k: (v[0] + 1, *v[1:]) if k == "classifier.weight" else v for k, v in names.items()}
    with pytest.raises(OrtArtifactError, match="shapes differ"):
        manifest.check(tensors=reshaped)


def test_damaged_or_incomplete_artifacts_are_refused(lora_dir: Path, tmp_path: Path) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    copy = tmp_path / "copy"
    shutil.copytree(lora_dir, copy)
    with open(copy / "eval_model.onnx", "r+b") as fh:  # flip one byte
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OrtArtifactError, match="sha256"):
        OrtTrainer(copy, get_task("sst2"))
    (copy / "eval_model.onnx").unlink()
    with pytest.raises(OrtArtifactError, match=r"eval_model\.onnx is missing"):
        OrtTrainer(copy, get_task("sst2"))
    (copy / MANIFEST_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(OrtArtifactError, match="format"):
        OrtTrainer(copy, get_task("sst2"))


# -- the manifest and the global version it was built from ---------------------------------------------------
def test_manifest_records_the_build_and_the_global_version(lora_dir: Path) -> None:
    from ffm_edge.ort.artifacts import global_state_from_frame
    from ffm_edge.ort.trainer import OrtTrainer
    from ffm_edge.trainer import TorchTrainer

    manifest = load_manifest(lora_dir)
    assert (manifest.spec, manifest.strategy, manifest.task, manifest.num_labels) == ("minilm-l6-v2", "lora", "sst2", 2)
    assert manifest.global_version == GLOBAL_VERSION
    assert manifest.opset == 14 and manifest.max_length == 32
    assert manifest.versions["onnx"] and manifest.versions["onnxruntime"]
    assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"} <= set(manifest.files)
    torch_trainer = TorchTrainer(short_spec(), get_task("sst2"), "lora", seed=0)
    # Exactly TorchTrainer's canonical names and shapes: every LoRA B matrix is its own tensor.
    assert manifest.tensor_names == torch_trainer.tensor_names
    assert manifest.num_trainable == torch_trainer.num_trainable() == 74_498
    ort = OrtTrainer(lora_dir, get_task("sst2"), spec="minilm-l6-v2", strategy="lora")
    _, frame_state = global_state_from_frame(lora_dir.parent / "global-lora.ffmg")
    state = ort.trainable_state()
    assert list(state) == torch_trainer.tensor_names
    for name, value in frame_state.items():  # the checkpoint starts from the global version it was built from
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_loading_a_global_version_updates_the_checkpoint_in_place(lora_dir: Path) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    ort = OrtTrainer(lora_dir, get_task("sst2"))
    data = sentiment_data(16, seed=1)
    before = ort.loss(data)
    state = ort.trainable_state()
    changed = {k: v * np.float32(0.5) + np.float32(0.003) for k, v in state.items()}
    ort.load_trainable_state(changed)
    after = ort.trainable_state()
    for name in state:
        np.testing.assert_array_equal(after[name], changed[name])
    assert ort.loss(data) != pytest.approx(before, abs=1e-6)  # the sessions see the new values
    with pytest.raises(ConfigError, match="missing"):
        ort.load_trainable_state({k: v for k, v in state.items() if k != "classifier.bias"})
    with pytest.raises(ConfigError, match="shape"):
        ort.load_trainable_state({**state, "classifier.bias": np.zeros(5, np.float32)})
    ort.load_trainable_state(state)
    assert ort.loss(data) == pytest.approx(before, abs=1e-6)


def test_tokenizer_matches_transformers_without_torch(lora_dir: Path) -> None:
    from transformers import AutoTokenizer

    from ffm_edge.ort.trainer import _Tokenizer

    manifest = load_manifest(lora_dir)
    mine = _Tokenizer(lora_dir, manifest)
    reference = AutoTokenizer.from_pretrained(short_spec().resolve_checkpoint())
    long = " ".join(["word"] * 80)
    for pairs in (
        [("a short one", None), (long, None), ("Mixed CASE, punctuation!", None)],
        [("first sentence", "second one"), (long, long), ("x", "y z")],
    ):
        first, second = [a for a, _ in pairs], [b for _, b in pairs]
        expected = reference(
            first,
            second if second[0] is not None else None,
            truncation=True,
            max_length=32,
            padding=True,
            return_tensors="np",
        )
        got = mine(pairs)
        for name in manifest.inputs:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


# -- numerical agreement with torch ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "prompt"])
def test_one_ort_step_matches_one_torch_step(strategy: str, art_root: Path) -> None:
    """Same start, same batch, dropout off on both sides: same loss, same parameter update.

    Tolerances: the loss within 1e-5 (measured ~1e-7); per tensor, the update's difference within 2 % of the
    update's norm (relative L2) and every element within 10 % of the learning rate. AdamW's first step is
    about ``lr * sign(g)`` wherever the gradient is well above eps, so elements with a tiny gradient carry
    most of the difference (measured: at most 1.3 % of lr for the LoRA B matrices, one prompt element of
    6,144 at 3.9 % of lr, ~1e-6 for the head). The difference comes from eager (ORT) vs SDPA (torch)
    attention and summation order.
    """
    from torch import nn

    from ffm_edge.ort.trainer import OrtTrainer
    from ffm_edge.trainer import TorchTrainer

    folder = built_artifacts(art_root, strategy, dropout=False, from_frame=strategy == "lora")
    task = get_task("sst2")
    data = sentiment_data(16, seed=5)
    ort = OrtTrainer(folder, task, threads=1)
    torch_trainer = TorchTrainer(short_spec(), task, strategy, seed=0)
    for module in torch_trainer.model.modules():  # the artifacts were exported with dropout off
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    start = ort.trainable_state()
    torch_trainer.load_trainable_state(start)
    assert ort.learning_rate == torch_trainer.learning_rate
    assert ort.loss(data) == pytest.approx(torch_trainer.loss(data), abs=1e-5)
    ort_report = ort.train(data, max_steps=1, seed=7)
    torch_report = torch_trainer.train(data, max_steps=1, seed=7)
    assert ort_report.steps == torch_report.steps == 1
    assert ort_report.first_loss == pytest.approx(torch_report.first_loss, abs=1e-5)
    ort_state, torch_state = ort.trainable_state(), torch_trainer.trainable_state()
    lr = ort.learning_rate
    for name in start:
        ort_delta, torch_delta = ort_state[name] - start[name], torch_state[name] - start[name]
        np.testing.assert_allclose(ort_delta, torch_delta, atol=0.1 * lr, rtol=0, err_msg=name)
        if torch_delta.any():  # LoRA A matrices do not move on the first step (B starts at zero)
            relative = float(np.linalg.norm(ort_delta - torch_delta) / np.linalg.norm(torch_delta))
            assert relative < 0.02, (name, relative)
        else:
            assert not ort_delta.any(), name
    # A second train() starts a fresh optimizer, as TorchTrainer does: the same start gives the same step.
    ort.load_trainable_state(start)
    again = ort.train(data, max_steps=1, seed=7)
    assert again.first_loss == pytest.approx(ort_report.first_loss, abs=1e-6)
    np.testing.assert_allclose(ort.trainable_state()["classifier.weight"], ort_state["classifier.weight"], atol=1e-7)


def test_ort_training_learns_and_evaluates(lora_dir: Path) -> None:
    from ffm_edge.ort.trainer import OrtTrainer

    ort = OrtTrainer(lora_dir, get_task("sst2"), threads=1, batch_size=8)
    train = sentiment_data(32, seed=2)
    before = ort.loss(train)
    report = ort.train(train, epochs=3, seed=0)
    assert report.steps == 12 and report.num_samples == 32
    assert ort.loss(train) < before
    metrics = ort.evaluate(train)
    assert set(metrics) == {"accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    assert ort.predict(train).shape == (32,)


# -- without torch -------------------------------------------------------------------------------------------
_DEVICE = """
import json, sys
import numpy as np
from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.spec import load_model_spec
from ffm_edge.wire import UpdateMeta, decode_update, encode_update
import dataclasses

try:
    import torch  # noqa: F401
    torch_importable = True
except ImportError:
    torch_importable = False
spec = dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=32)
texts = [(f"a wonderful film {i}" if i % 2 else f"a dull mess {i}", None) for i in range(16)]
data = LabeledData(get_task("sst2"), texts, np.array([i % 2 for i in range(16)]))
client = EdgeClient(spec, data, device_id="no-torch", runtime="auto", ort_artifacts=sys.argv[1], batch_size=8,
                    state_dir=sys.argv[2], threads=1)
trainer = client.trainer
start = trainer.trainable_state()
report = trainer.train(data, epochs=1, seed=0)
local = trainer.trainable_state()
delta = trainer.strategy.finalize_update({k: local[k] - start[k] for k in local})
meta = UpdateMeta(federation="f", device="no-torch", update_id="0" * 32, base_version=3, strategy=trainer.strategy.name,
                  num_samples=len(data), codec="int8", created_at=0.0, metrics={"train_loss": report.mean_loss})
frame = encode_update(meta, delta)
decoded_meta, decoded = decode_update(frame)
print("RESULT " + json.dumps({
    "runtime": client.runtime,
    "torch_importable": torch_importable,
    "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None),
    "names": sorted(decoded),
    "shapes": {k: list(v.shape) for k, v in decoded.items()},
    "strategy": decoded_meta.strategy,
    "steps": report.steps,
    "max_error": max(float(np.abs(decoded[k] - delta[k]).max()) for k in delta),
    "max_delta": max(float(np.abs(delta[k]).max()) for k in delta),
}))
"""


@pytest.mark.slow
def test_a_device_without_torch_trains_and_sends_a_valid_update(lora_dir: Path, tmp_path: Path) -> None:
    """A subprocess in which ``import torch`` fails builds an EdgeClient (runtime auto -> ORT), trains and
    encodes an update that the real wire codec decodes, with exactly TorchTrainer's tensor names."""
    env = device_env(tmp_path, block_torch=True)
    proc = subprocess.run(
        [sys.executable, "-c", _DEVICE, str(lora_dir), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["torch_importable"] is False and result["torch_loaded"] is False
    assert result["runtime"] == "ort"
    manifest = load_manifest(lora_dir)
    assert result["names"] == manifest.tensor_names
    assert result["shapes"] == {t.name: list(t.shape) for t in manifest.tensors}
    assert result["strategy"] == "lora" and result["steps"] == 2
    assert 0 < result["max_delta"]
    assert result["max_error"] <= result["max_delta"] / 100  # int8 per-channel: within 1 % of the largest step


_TORCH_INSTALLED_DEVICE = """
import sys
import numpy as np
from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.spec import load_model_spec
import dataclasses

spec = dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=32)
data = LabeledData(get_task("sst2"), [(f"text {i}", None) for i in range(8)], np.array([i % 2 for i in range(8)]))
client = EdgeClient(spec, data, device_id="has-torch", runtime="ort", ort_artifacts=sys.argv[1], batch_size=8,
                    state_dir=sys.argv[2], threads=1)
client.trainer.train(data, epochs=1, seed=0)
print("TORCH-LOADED", "torch" in sys.modules)
"""


@pytest.mark.slow
def test_the_ort_runtime_does_not_import_torch_where_torch_is_installed(lora_dir: Path, tmp_path: Path) -> None:
    """onnxruntime's own import-time validation would import torch (via onnxruntime.training); the runtime
    avoids that, so a device with torch installed that trains on ORT does not pay for torch either."""
    env = device_env(tmp_path, block_torch=False)
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_INSTALLED_DEVICE, str(lora_dir), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH-LOADED False" in proc.stdout
