"""Bytes on the wire per client-round for a real LoRA update, per FFM codec, next to Flower.

What is measured (one client, one round):

1. A real update: all-MiniLM-L6-v2 with the ``lora`` strategy (LoRA on query/value + the task head) is
   trained for one short epoch on a small sentiment dataset built here; the update is the delta between
   the trained and the initial trainable tensors, exactly as ``EdgeClient.run_round`` builds it.
2. For each codec (fp32, fp16, int8): the safetensors payload, the versioned and hashed envelope
   (``encode_update``), the chunk frames that actually go over MQTT (``split_frame`` at the client's default
   64 KiB), the number of MQTT messages and their exact MQTT 3.1.1 PUBLISH overhead (QoS 1, as the client
   publishes), the reconstruction error after decoding, and the encode/decode time (median).
3. Flower: ``flwr.common.ndarrays_to_parameters`` on the same tensors as float32 numpy arrays (what a
   Flower client sends), measured by ``benchmarks/flower_side.py`` in a separate virtualenv because flwr
   and amqtt need incompatible ``typer`` versions.

Results go to ``benchmarks/results/bandwidth.json`` and ``bandwidth.md``, and the table to stdout.

    python benchmarks/bandwidth.py --setup-flower
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
FLOWER_SIDE = BENCH_DIR / "flower_side.py"
DEFAULT_FLOWER_VENV = BENCH_DIR / ".flower-venv"
FLOWER_REQUIREMENTS = ("flwr==1.42.*", "safetensors", "numpy")

#: The client's default chunk size (``EdgeClient(chunk_size=64 * 1024)``).
DEFAULT_CHUNK_SIZE = 64 * 1024
#: PUBACK a QoS 1 publisher receives per message: fixed header (2) + packet id (2).
PUBACK_BYTES = 4

_POSITIVE = ("wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping", "beautiful")
_NEGATIVE = ("dull", "lifeless", "tedious", "clumsy", "awful", "boring", "silly", "painful")
_SUBJECTS = ("film", "script", "cast", "story", "soundtrack", "ending", "direction", "performance")
_TEMPLATES = ("a {adj} {subj}", "the {subj} was {adj}", "what a {adj} {subj} this is", "i found the {subj} {adj}")


@dataclass(frozen=True)
class Settings:
    """Everything that defines one run (written into the JSON)."""

    model: str = "minilm-l6-v2"
    task: str = "sst2"
    strategy: str = "lora"
    num_sentences: int = 32
    epochs: int = 1
    seed: int = 0
    codecs: tuple[str, ...] = ("fp32", "fp16", "int8")
    chunk_size: int = DEFAULT_CHUNK_SIZE
    federation: str = "demo"
    device: str = "edge-0"
    mqtt_qos: int = 1
    mqtt_protocol: str = "MQTT 3.1.1"
    repeats: int = 15


@dataclass
class RealUpdate:
    """A trained LoRA delta and what it came from."""

    delta: dict[str, np.ndarray]
    model_parameters: int
    trainable_parameters: int
    train: dict[str, Any]
    delta_stats: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------------
# The update
# -------------------------------------------------------------------------------------------------------


def sentiment_sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` short, balanced movie-review sentences (label 1 = positive) built from word lists."""
    if n < 2:
        raise ValueError(f"need at least 2 sentences, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    texts = []
    for label in labels:
        adj = rng.choice(_POSITIVE if label else _NEGATIVE)
        texts.append(str(rng.choice(_TEMPLATES)).format(adj=adj, subj=rng.choice(_SUBJECTS)))
    return texts, labels


def _is_adapter_parameter(name: str) -> bool:
    """LoRA matrices and peft's trainable copy of the head: not part of the original model."""
    return "lora_" in name or ".modules_to_save." in name


def build_update(settings: Settings) -> RealUpdate:
    """Train the strategy once on the built dataset; return ``trained - initial`` for its tensors."""
    from ffm_edge.data import LabeledData, get_task
    from ffm_edge.spec import load_model_spec
    from ffm_edge.trainer import TorchTrainer

    task = get_task(settings.task)
    started = time.perf_counter()
    trainer = TorchTrainer(load_model_spec(settings.model), task, settings.strategy, seed=settings.seed)
    load_seconds = time.perf_counter() - started
    initial = trainer.trainable_state()
    texts, labels = sentiment_sentences(settings.num_sentences, settings.seed)
    data = LabeledData(task, [(t, None) for t in texts], labels, split="train", source="built:sentiment")
    report = trainer.train(data, epochs=settings.epochs)
    trained = trainer.trainable_state()
    delta = {name: (trained[name] - initial[name]).astype(np.float32) for name in sorted(trained)}

    named = list(trainer.model.named_parameters())
    model_parameters = sum(p.numel() for n, p in named if not _is_adapter_parameter(n))
    flat = np.concatenate([d.ravel() for d in delta.values()])
    return RealUpdate(
        delta=delta,
        model_parameters=int(model_parameters),
        trainable_parameters=int(trainer.num_trainable()),
        train={
            "num_samples": report.num_samples,
            "steps": report.steps,
            "epochs": report.epochs,
            "first_loss": report.first_loss,
            "last_loss": report.last_loss,
            "train_seconds": report.seconds,
            "model_load_seconds": load_seconds,
            "batch_size": trainer.batch_size,
            "learning_rate": trainer.learning_rate,
        },
        delta_stats={
            "num_tensors": len(delta),
            "num_elements": int(flat.size),
            "l2_norm": float(np.linalg.norm(flat.astype(np.float64))),
            "max_abs": float(np.abs(flat).max()),
            "nonzero_fraction": float(np.count_nonzero(flat) / flat.size),
        },
    )


# -------------------------------------------------------------------------------------------------------
# MQTT framing
# -------------------------------------------------------------------------------------------------------


def remaining_length_size(value: int) -> int:
    """Bytes of MQTT's variable-length "remaining length" field for ``value`` (1 to 4)."""
    if value < 0 or value > 268_435_455:
        raise ValueError(f"remaining length {value} is outside MQTT's 0..268435455")
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def publish_overhead(topic: str, payload_size: int, qos: int = 1) -> int:
    """Bytes an MQTT 3.1.1 PUBLISH packet adds to its payload.

    Fixed header (1 byte + remaining length) + topic (2-byte length + UTF-8) + packet id (2 bytes, QoS > 0).
    """
    variable_header = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0)
    return 1 + remaining_length_size(variable_header + payload_size) + variable_header


def _amqtt_publish_size(topic: str, payload: bytes, qos: int) -> int | None:
    """Length of the PUBLISH packet amqtt builds, to cross-check :func:`publish_overhead` (None: no amqtt)."""
    try:
        from amqtt.mqtt.publish import PublishPacket
    except ImportError:
        return None
    packet = PublishPacket.build(topic, payload, 1 if qos > 0 else None, False, qos, False)
    return len(packet.to_bytes())


# -------------------------------------------------------------------------------------------------------
# FFM codecs
# -------------------------------------------------------------------------------------------------------


def _update_meta(settings: Settings, codec: str, update: RealUpdate, update_id: str) -> Any:
    from ffm_edge.wire import UpdateMeta

    return UpdateMeta(
        federation=settings.federation,
        device=settings.device,
        update_id=update_id,
        base_version=0,
        strategy=settings.strategy,
        num_samples=int(update.train["num_samples"]),
        codec=codec,
        created_at=time.time(),
        metrics={"train_loss": float(update.train["last_loss"]), "train_seconds": float(update.train["train_seconds"])},
    )


def _errors(original: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> dict[str, float]:
    if set(original) != set(decoded):
        raise AssertionError("decoded update holds different tensors")
    diff = np.concatenate([(decoded[n].astype(np.float64) - original[n]).ravel() for n in sorted(original)])
    ref = np.concatenate([original[n].astype(np.float64).ravel() for n in sorted(original)])
    norm = float(np.linalg.norm(ref))
    return {
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "relative_l2_error": float(np.linalg.norm(diff) / norm) if norm > 0 else 0.0,
    }


def payload_breakdown(payload: bytes) -> dict[str, int]:
    """Split a safetensors payload into its header, tensor values and int8 scales (bytes)."""
    from ffm_edge.wire import SCALE_SUFFIX

    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + header_len])
    header.pop("__metadata__", None)
    sizes = {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()}
    scales = sum(size for name, size in sizes.items() if name.endswith(SCALE_SUFFIX))
    return {
        "safetensors_header_bytes": 8 + header_len,
        "tensor_data_bytes": sum(sizes.values()) - scales,
        "scale_bytes": scales,
    }


def measure_codec(settings: Settings, codec: str, update: RealUpdate) -> dict[str, Any]:
    """Sizes, MQTT framing, reconstruction error and timings of one codec for ``update``."""
    from ffm_edge.wire import ChunkAssembler, Topics, decode_update, encode_tensors, encode_update, split_frame

    delta = update.delta
    topic = Topics(settings.federation).uplink_update(settings.device)
    update_id = uuid.uuid4().hex  # what EdgeClient uses, also as the transfer id
    meta = _update_meta(settings, codec, update, update_id)
    payload = encode_tensors(delta, codec)
    frame = encode_update(meta, delta)
    chunks = split_frame(frame, chunk_size=settings.chunk_size, transfer_id=update_id)

    overheads = [publish_overhead(topic, len(c), settings.mqtt_qos) for c in chunks]
    checked = [_amqtt_publish_size(topic, c, settings.mqtt_qos) for c in chunks]
    if all(size is not None for size in checked):
        for size, chunk, overhead in zip(checked, chunks, overheads, strict=True):
            if size != len(chunk) + overhead:
                raise AssertionError(f"amqtt builds {size} bytes, computed {len(chunk) + overhead}")
        verified_by = "amqtt PublishPacket"
    else:
        verified_by = None

    encode_s: list[float] = []
    decode_s: list[float] = []
    decoded: dict[str, np.ndarray] = {}
    for _ in range(max(1, settings.repeats)):
        started = time.perf_counter()
        frame_r = encode_update(meta, delta)
        chunks_r = split_frame(frame_r, chunk_size=settings.chunk_size, transfer_id=update_id)
        encode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        assembler = ChunkAssembler()
        completed = None
        for chunk in chunks_r:
            completed = assembler.add(chunk) or completed
        if completed is None:
            raise AssertionError("chunks did not reassemble")
        _, decoded = decode_update(completed.data)
        decode_s.append(time.perf_counter() - started)

    chunk_total = sum(len(c) for c in chunks)
    mqtt_overhead = sum(overheads)
    return {
        "codec": codec,
        "payload_bytes": len(payload),
        "payload_breakdown": payload_breakdown(payload),
        "envelope_bytes": len(frame),
        "envelope_header_bytes": len(frame) - len(payload),
        "chunk_frames_bytes": chunk_total,
        "chunk_headers_bytes": chunk_total - len(frame),
        "mqtt_messages": len(chunks),
        "mqtt_publish_overhead_bytes": mqtt_overhead,
        "mqtt_publish_bytes": chunk_total + mqtt_overhead,
        "mqtt_puback_bytes": PUBACK_BYTES * len(chunks) if settings.mqtt_qos > 0 else 0,
        "mqtt_overhead_verified_by": verified_by,
        **_errors(delta, decoded),
        "encode_ms": 1000 * statistics.median(encode_s),
        "decode_ms": 1000 * statistics.median(decode_s),
    }


# -------------------------------------------------------------------------------------------------------
# Flower
# -------------------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (keeps machine paths out of results)."""
    try:
        return str(path.absolute().relative_to(BENCH_DIR.parent))
    except ValueError:
        return str(path)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup_flower_venv(venv: Path = DEFAULT_FLOWER_VENV) -> Path:
    """Make ``venv`` a virtualenv with Flower, safetensors and numpy (created or completed); return its python."""
    python = _venv_python(venv)
    if not python.exists():
        print(f"creating the Flower virtualenv in {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = [str(python), "-c", "import flwr, safetensors.numpy, numpy"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        print(f"installing {' '.join(FLOWER_REQUIREMENTS)} into {venv} ...", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *FLOWER_REQUIREMENTS], check=True)
    return python


def find_flower_python(explicit: str | None, *, setup: bool) -> tuple[Path | None, str]:
    """The Flower interpreter to use and how it was chosen (None + the reason when there is none)."""
    if explicit:
        return Path(explicit), "--flower-python"
    if setup:
        try:
            return setup_flower_venv(), f"--setup-flower ({_shown(DEFAULT_FLOWER_VENV)})"
        except (OSError, subprocess.CalledProcessError) as exc:
            return None, f"creating {_shown(DEFAULT_FLOWER_VENV)} failed: {exc}"
    python = _venv_python(DEFAULT_FLOWER_VENV)
    if python.exists():
        return python, f"default venv ({_shown(DEFAULT_FLOWER_VENV)})"
    return None, f"no --flower-python and no {_shown(DEFAULT_FLOWER_VENV)} (run with --setup-flower)"


def measure_flower(delta: Mapping[str, np.ndarray], python: Path | None, reason: str, repeats: int) -> dict[str, Any]:
    """Run ``flower_side.py`` with ``python`` on ``delta``; ``status`` is ``measured`` or ``missing``."""
    if python is None:
        return {"status": "missing", "reason": reason}
    import safetensors.numpy

    with tempfile.TemporaryDirectory(prefix="ffm-bandwidth-") as tmp:
        path = Path(tmp) / "delta.safetensors"
        safetensors.numpy.save_file({n: np.ascontiguousarray(a, np.float32) for n, a in delta.items()}, str(path))
        command = [str(python), str(FLOWER_SIDE), str(path), "--repeats", str(max(1, repeats))]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"status": "missing", "reason": f"{python} could not run flower_side.py: {exc}"}
    if done.returncode != 0:
        tail = [line.strip() for line in (done.stderr or done.stdout).strip().splitlines()[-3:]]
        return {"status": "missing", "reason": f"flower_side.py failed ({done.returncode}): {' | '.join(tail)}"}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        return {"status": "missing", "reason": f"flower_side.py printed no JSON: {exc}"}
    return {"status": "measured", "python_executable": _shown(python), "chosen_by": reason, **result}


# -------------------------------------------------------------------------------------------------------
# The whole benchmark
# -------------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(flower: Mapping[str, Any]) -> dict[str, Any]:
    """Versions and machine facts for the JSON."""
    import torch

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "numpy": np.__version__,
        "amqtt": _version("amqtt"),
        "flwr": flower.get("flwr_version"),
        "flower_python": flower.get("python"),
        "flower_numpy": flower.get("numpy_version"),
    }


def _ratios(result: dict[str, Any]) -> dict[str, Any]:
    full = result["model"]["full_model_fp32_bytes"]
    flower = result["flower"]
    flower_bytes = flower.get("total_bytes") if flower.get("status") == "measured" else None
    out: dict[str, Any] = {}
    for row in result["codecs"]:
        wire = row["chunk_frames_bytes"]
        out[row["codec"]] = {
            "ffm_wire_over_flower": wire / flower_bytes if flower_bytes else None,
            "ffm_wire_over_full_model_fp32": wire / full,
            "full_model_fp32_over_ffm_wire": full / wire,
        }
    return out


def run_benchmark(
    settings: Settings,
    *,
    flower_python: Path | None = None,
    flower_reason: str = "Flower not requested",
    out_dir: Path | None = RESULTS_DIR,
) -> dict[str, Any]:
    """Measure everything; write ``bandwidth.json`` and ``bandwidth.md`` into ``out_dir`` (if given)."""
    started = time.perf_counter()
    update = build_update(settings)
    codecs = [measure_codec(settings, codec, update) for codec in settings.codecs]
    flower = measure_flower(update.delta, flower_python, flower_reason, settings.repeats)
    result: dict[str, Any] = {
        "benchmark": "bandwidth",
        "description": "bytes on the wire per client-round for a real LoRA update, per FFM codec, next to Flower",
        "settings": {**asdict(settings), "codecs": list(settings.codecs)},
        "model": {
            "name": settings.model,
            "strategy": settings.strategy,
            "model_parameters": update.model_parameters,
            "trainable_parameters": update.trainable_parameters,
            "trainable_fraction": update.trainable_parameters / update.model_parameters,
            "full_model_fp32_bytes": 4 * update.model_parameters,
        },
        "training": update.train,
        "delta": update.delta_stats,
        "codecs": codecs,
        "flower": flower,
    }
    result["ratios"] = _ratios(result)
    result["environment"] = environment(flower)
    result["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bandwidth.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out_dir / "bandwidth.md").write_text(render_markdown(result), encoding="utf-8")
    return result


# -------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------


def _b(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}×"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.3g} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(result: Mapping[str, Any]) -> str:
    """The person-readable report (also printed to stdout)."""
    s, m, t, d, env = (result[k] for k in ("settings", "model", "training", "delta", "environment"))
    flower = result["flower"]
    measured = flower.get("status") == "measured"
    lines = [
        "# Bandwidth per client-round: FFM LoRA update vs Flower",
        "",
        f"Model `{m['name']}`, strategy `{m['strategy']}`: {m['trainable_parameters']:,} trainable of "
        f"{m['model_parameters']:,} parameters ({100 * m['trainable_fraction']:.3f} %). "
        f"Update = trained − initial after {t['epochs']} epoch ({t['steps']} steps, batch {t['batch_size']}, "
        f"lr {t['learning_rate']:g}) on {t['num_samples']} built sentiment sentences "
        f"(loss {t['first_loss']:.4f} → {t['last_loss']:.4f}); delta L2 {d['l2_norm']:.4g}, "
        f"max |Δ| {d['max_abs']:.4g}, {d['num_tensors']} tensors.",
        f"Chunk size {s['chunk_size']:,} B; topic `ffm/v1/{s['federation']}/up/{s['device']}/update`, "
        f"{s['mqtt_protocol']} QoS {s['mqtt_qos']}; timings are medians of {s['repeats']} runs "
        f"on {env['cpu_count']} CPU(s), {env['date_utc']}.",
        "",
    ]
    header = [
        "codec",
        "payload B",
        "envelope B",
        "chunk frames B",
        "MQTT msgs",
        "PUBLISH overhead B",
        "on the wire B",
        "vs Flower",
        "vs full model",
        "max abs err",
        "rel L2 err",
        "encode ms",
        "decode ms",
    ]
    rows = []
    for row in result["codecs"]:
        ratio = result["ratios"][row["codec"]]
        rows.append(
            [
                f"FFM {row['codec']}",
                _b(row["payload_bytes"]),
                _b(row["envelope_bytes"]),
                _b(row["chunk_frames_bytes"]),
                str(row["mqtt_messages"]),
                _b(row["mqtt_publish_overhead_bytes"]),
                _b(row["mqtt_publish_bytes"]),
                _x(ratio["ffm_wire_over_flower"]),
                _pct(ratio["ffm_wire_over_full_model_fp32"]),
                f"{row['max_abs_error']:.2e}",
                f"{row['relative_l2_error']:.2e}",
                f"{row['encode_ms']:.2f}",
                f"{row['decode_ms']:.2f}",
            ]
        )
    if measured:
        full = m["full_model_fp32_bytes"]
        rows.append(
            [
                "Flower fp32 (`ndarrays_to_parameters`)",
                _b(flower["total_bytes"]),
                "—",
                "—",
                "—",
                "—",
                "—",
                _x(1.0),
                _pct(flower["total_bytes"] / full),
                "0" if flower.get("roundtrip_exact") else "not exact",
                "0" if flower.get("roundtrip_exact") else "not exact",
                f"{flower['serialize_ms']:.2f}",
                f"{flower['deserialize_ms']:.2f}",
            ]
        )
    rows.append(
        ["full model, raw fp32 (naive FedAvg)", _b(m["full_model_fp32_bytes"]), *["—"] * 5, "—", _pct(1.0), *["—"] * 4]
    )
    lines += _table(header, rows)
    lines += [
        "",
        "*on the wire* = chunk frames + MQTT PUBLISH headers; *vs Flower* / *vs full model* = chunk frames over "
        "Flower's `Parameters` bytes / over 4 B × every model parameter; errors are of the decoded delta.",
        "",
    ]
    breakdown = [
        [
            f"FFM {row['codec']}",
            _b(row["payload_breakdown"]["tensor_data_bytes"]),
            _b(row["payload_breakdown"]["scale_bytes"]),
            _b(row["payload_breakdown"]["safetensors_header_bytes"]),
            _b(row["envelope_header_bytes"]),
            _b(row["chunk_headers_bytes"]),
        ]
        for row in result["codecs"]
    ]
    lines += ["Where the FFM bytes go:", ""]
    lines += _table(
        ["codec", "tensor values B", "int8 scales B", "safetensors header B", "envelope header B", "chunk headers B"],
        breakdown,
    )
    lines.append("")
    if measured:
        proto = flower.get("protobuf_bytes")
        lines.append(
            f"Flower {flower['flwr_version']} (Python {flower['python']}): `Parameters.tensors` "
            f"{flower['tensors_bytes']:,} B + tensor_type `{flower['tensor_type']}` {flower['tensor_type_bytes']} B "
            f"= {flower['total_bytes']:,} B for {flower['num_tensors']} float32 arrays"
            + (f"; as a protobuf message {proto:,} B (gRPC framing not counted)." if proto else ".")
        )
    else:
        lines.append(f"**Flower column missing**: {flower.get('reason', 'not measured')}. No Flower figure is shown.")
    lines += [
        "",
        "Ratios (chunk frames total, i.e. the MQTT payload bytes, over the reference):",
        "",
    ]
    ratio_rows = [
        [
            f"FFM {c}",
            _x(r["ffm_wire_over_flower"]),
            _pct(r["ffm_wire_over_full_model_fp32"]),
            f"{r['full_model_fp32_over_ffm_wire']:,.0f}× smaller",
        ]
        for c, r in result["ratios"].items()
    ]
    lines += _table(["codec", "FFM / Flower", "FFM / full model fp32", "full model fp32 / FFM"], ratio_rows)
    lines += [
        "",
        "Not counted anywhere: TCP/IP/TLS framing; for MQTT also the broker→hub hop and the "
        f"{PUBACK_BYTES}-byte PUBACK per message (QoS 1); for Flower the gRPC/HTTP2 framing.",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/bandwidth.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Bytes on the wire per client-round for a real LoRA update of all-MiniLM-L6-v2, per FFM codec "
            "(fp32, fp16, int8), next to Flower.\n\n"
            "Trains the lora strategy (LoRA matrices + task head) for one short epoch on a small built "
            "sentiment dataset,\ntakes delta = trained - initial (as EdgeClient.run_round does) and reports, "
            "per codec: safetensors payload,\nenvelope (encode_update), chunk frames at the client's default "
            "64 KiB (split_frame), MQTT message count\nand exact MQTT 3.1.1 PUBLISH overhead (QoS 1), "
            "reconstruction error (max abs, relative L2) and encode/decode\ntime. Flower's "
            "ndarrays_to_parameters for the same float32 tensors is measured by benchmarks/flower_side.py\n"
            "in its own virtualenv (flwr and amqtt need incompatible typer versions). Without Flower the FFM "
            "figures are\nstill written and the Flower column is marked missing."
        ),
        epilog=(
            "Writes benchmarks/results/bandwidth.json (figures, settings, environment) and bandwidth.md, and "
            "prints the table.\nExample: python benchmarks/bandwidth.py --setup-flower"
        ),
    )
    parser.add_argument(
        "--flower-python", metavar="PATH", help="python of a venv with flwr==1.42.*, safetensors, numpy"
    )
    parser.add_argument(
        "--setup-flower",
        action="store_true",
        help=f"create {DEFAULT_FLOWER_VENV.relative_to(BENCH_DIR.parent)} with Flower when it is absent or incomplete",
    )
    parser.add_argument("--no-flower", action="store_true", help="skip Flower (its column is marked missing)")
    parser.add_argument("--sentences", type=_positive_int, default=32, help="training sentences (default 32)")
    parser.add_argument("--epochs", type=_positive_int, default=1, help="local epochs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, data and order (default 0)")
    parser.add_argument(
        "--codecs", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"], help="codecs"
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=DEFAULT_CHUNK_SIZE, help="chunk data bytes (default 65536)"
    )
    parser.add_argument("--repeats", type=_positive_int, default=15, help="timing repetitions, median (default 15)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where bandwidth.json/.md go")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        num_sentences=args.sentences,
        epochs=args.epochs,
        seed=args.seed,
        codecs=tuple(args.codecs),
        chunk_size=args.chunk_size,
        repeats=args.repeats,
    )
    if args.no_flower:
        python, reason = None, "skipped with --no-flower"
    else:
        python, reason = find_flower_python(args.flower_python, setup=args.setup_flower)
    result = run_benchmark(settings, flower_python=python, flower_reason=reason, out_dir=args.out_dir)
    print(render_markdown(result))
    if result["flower"]["status"] != "measured":
        print(f"NOTE: Flower column missing: {result['flower']['reason']}", file=sys.stderr)
    print(f"wrote {args.out_dir / 'bandwidth.json'} and {args.out_dir / 'bandwidth.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
