"""The manifest next to a set of ONNX training artifacts: what they were built from, and their hashes.

A device must never train a graph for another model, strategy or task, or with tensors the hub does not
know: the update would be rejected at best and silently wrong at worst. So the builder writes
``ffm-ort.json`` (spec, strategy, task, every trainable tensor's name and shape, opset, library
versions, the global version the trainable values came from, and the sha256 of every file), and the
device checks it before loading anything. Torch-free: a device reads it with the standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffm_edge.errors import OrtArtifactError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PIXELS_INPUT",
    "ArtifactManifest",
    "TensorInfo",
    "file_sha256",
    "load_manifest",
]

MANIFEST_NAME = "ffm-ort.json"
#: The one input of an image model's graph: float32 pixels (N, H, W, 3) in 0..255, any H and W; the graph
#: resizes and normalizes them as the torch path does, so a device needs no image library. Text graphs take
#: token ids instead (``input_ids``, ``attention_mask``, ...), so ``inputs`` tells the two apart.
PIXELS_INPUT = "pixels"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorInfo:
    """One trainable tensor: its canonical (wire) name and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ArtifactManifest:
    """What a folder of ORT training artifacts holds (see the module docstring)."""

    spec: str
    strategy: str
    strategy_config: dict[str, Any]
    task: str
    num_labels: int
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[str, ...]
    max_length: int
    opset: int
    dropout: bool
    optimizer: dict[str, Any]
    training: dict[str, Any]
    tokenizer: dict[str, Any]
    global_version: int | None
    versions: dict[str, str | None]
    files: dict[str, str]
    created_at: str = ""
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_names(self) -> list[str]:
        """Trainable tensor names, sorted (the order TorchTrainer uses)."""
        return sorted(t.name for t in self.tensors)

    @property
    def num_trainable(self) -> int:
        """Trainable scalars."""
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    def to_json(self) -> str:
        """The manifest as the JSON text written to :data:`MANIFEST_NAME`."""
        data = asdict(self)
        data["tensors"] = [{"name": t.name, "shape": list(t.shape)} for t in self.tensors]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> ArtifactManifest:
        """Parse and validate a manifest; any problem is an :class:`OrtArtifactError`."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if data.get("format") != FORMAT_VERSION:
                raise OrtArtifactError(
                    f"{where}: artifact format {data.get('format')!r}, this SDK reads format {FORMAT_VERSION}; "
                    "rebuild the artifacts with this version of ffm"
                )
            data["tensors"] = tuple(
                TensorInfo(str(t["name"]), tuple(int(d) for d in t["shape"])) for t in data["tensors"]
            )
            data["inputs"] = tuple(str(i) for i in data["inputs"])
            return cls(**data)
        except OrtArtifactError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise OrtArtifactError(f"{where} is not a valid ORT artifact manifest: {exc}") from exc

    def check(
        self,
        *,
        spec: str | None = None,
        strategy: str | None = None,
        num_labels: int | None = None,
        tensors: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Raise :class:`OrtArtifactError` when the artifacts were built for something else."""
        problems = []
        if spec is not None and spec != self.spec:
            problems.append(f"model spec {self.spec!r}, expected {spec!r}")
        if strategy is not None and strategy != self.strategy:
            problems.append(f"strategy {self.strategy!r}, expected {strategy!r}")
        if num_labels is not None and num_labels != self.num_labels:
            problems.append(f"{self.num_labels} labels, expected {num_labels}")
        if tensors is not None:
            mine = {t.name: t.shape for t in self.tensors}
            missing = sorted(set(tensors) - set(mine))[:3]
            extra = sorted(set(mine) - set(tensors))[:3]
            if missing or extra:
                problems.append(f"tensor names differ (missing {missing}, unexpected {extra})")
            else:
                wrong = [n for n in mine if tuple(tensors[n]) != mine[n]][:3]
                if wrong:
                    problems.append(f"tensor shapes differ for {wrong}")
        if problems:
            raise OrtArtifactError(
                f"ORT artifacts built for {self.spec}/{self.strategy}/{self.task} do not match: " + "; ".join(problems)
            )


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(folder: str | Path, *, verify: bool = True) -> ArtifactManifest:
    """Read ``folder``'s manifest; with ``verify``, check that every listed file is there with its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST_NAME}"
        raise OrtArtifactError(
            f"no ORT training artifacts in {folder} (the folder {what}); build them where torch is installed "
            "with `ffm-edge ort-build --model SPEC --strategy STRATEGY --task TASK --out FOLDER`"
        )
    manifest = ArtifactManifest.from_json(path.read_text(encoding="utf-8"), str(path))
    if verify:
        for name, expected in sorted(manifest.files.items()):
            file = folder / name
            if not file.is_file():
                raise OrtArtifactError(f"ORT artifacts in {folder} are incomplete: {name} is missing")
            if file_sha256(file) != expected:
                raise OrtArtifactError(f"ORT artifact {file} does not match its sha256 in {MANIFEST_NAME} (damaged?)")
    return manifest
