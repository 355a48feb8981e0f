"""Prepared base checkpoints, cached on disk: GGUF conversions and quantized bases.

Two kinds of preparation are slow or memory-hungry enough to do once per device:

* **GGUF conversion.** A spec whose checkpoint ships as a GGUF file (SmolLM2) dequantizes in 13–19 s,
  and transformers cannot ``save_pretrained`` a GGUF-loaded model. The first load copies the weights
  into a fresh model whose config has no ``gguf`` quantization entry and saves it as safetensors plus
  the tokenizer; every later load, at any precision, starts from that folder (about 0.1 s).
* **Quantized bases.** ``int8`` / ``nf4`` bases are quantized with bitsandbytes once and saved in their
  quantized form (the backbone only: the task head is created fresh, unquantized, at each load), so a
  device that chose a quantized base reads the small checkpoint and never holds the full-precision
  weights in memory again.

Entries live under ``$FFM_CACHE_DIR/checkpoints/<spec>/<precision>-<hash>/`` (``FFM_CACHE_DIR``
defaults to ``$XDG_CACHE_HOME/ffm`` or ``~/.cache/ffm``). The hash covers the source checkpoint's
identity (path, file sizes and times, or hub id), the quantization settings and the versions of the
libraries that wrote the files, so an upgrade or a new checkpoint gets a new entry instead of a stale
one. Entries are built in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written entry that later loads would trust.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ffm_edge.errors import ConfigError, FFMError
from ffm_edge.spec import PRECISIONS, ModelSpec

__all__ = [
    "CheckpointCacheError",
    "cache_key",
    "cached_checkpoint",
    "check_precision",
    "checkpoints_dir",
    "discard_checkpoint",
    "float32_kwargs",
    "prepare_checkpoint",
    "quantization_config",
    "require_bitsandbytes",
    "skip_patterns",
    "source_checkpoint",
]

log = logging.getLogger("ffm.checkpoints")

CACHE_FORMAT = 1
"""Bump when the layout or the meaning of a cache entry changes; old entries are then ignored."""

MARKER = "ffm-checkpoint.json"
"""Written last into a complete entry; a folder without it is not trusted."""

_STALE_TMP_S = 6 * 3600  # temporary build folders older than this belong to a crashed process


class CheckpointCacheError(FFMError):
    """A checkpoint could not be prepared or written to the cache (callers may load without it)."""


# -- where ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """FFM's cache folder: ``$FFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ffm``, else ``~/.cache/ffm``."""
    folder = os.environ.get("FFM_CACHE_DIR")
    if folder:
        return Path(os.path.expanduser(folder))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "ffm" if xdg else Path.home() / ".cache" / "ffm"


def checkpoints_dir() -> Path:
    """The folder of prepared checkpoints inside :func:`cache_root`."""
    return cache_root() / "checkpoints"


# -- precision and quantization settings --------------------------------------------------------------
def check_precision(spec: ModelSpec, precision: str) -> None:
    """Raise :class:`ConfigError` unless ``spec`` can be loaded at ``precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in spec.precisions:
        raise ConfigError(
            f"model {spec.name} (family {spec.family}) supports only {', '.join(spec.precisions)} precision, "
            f"not {precision!r}"
        )


def require_bitsandbytes(precision: str) -> None:
    """Import bitsandbytes (and check accelerate) for a quantized precision, or raise :class:`ConfigError`."""
    try:
        with _quiet_bitsandbytes_import():
            import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"precision {precision!r} needs the bitsandbytes package (pip install bitsandbytes): {exc}"
        ) from exc
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(f"precision {precision!r} needs the accelerate package (pip install accelerate)")
    # bitsandbytes warns on every 8-bit matmul that CPU inputs are cast to float16; once is plenty.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_bitsandbytes_import() -> Iterator[None]:
    # On AVX512-BF16 CPUs bitsandbytes looks for an optional hub kernel at import and logs a warning
    # when the `kernels` package is absent; it then uses its own (correct) CPU code.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpu_ops.setLevel(level)


def skip_patterns(names: tuple[str, ...] | list[str]) -> list[str]:
    """Module patterns for ``llm_int8_skip_modules`` that match ``names`` as module-name components.

    transformers 4.x skips a module when a pattern is a substring of its name; 5.x only matches from the
    start, by suffix or as an anchored regex, so ``"pooler"`` no longer skips ``bert.pooler.dense``. Each
    name is passed as given (4.x, and 5.x exact / suffix matches) and as a regex that finds it after any
    prefix (5.x); the regex is never a substring of a module name, so 4.x is unaffected by it.
    """
    patterns: list[str] = []
    for name in names:
        patterns.append(name)
        patterns.append(r"(?:.*\.)?" + re.escape(name))
    return patterns


def quantization_config(spec: ModelSpec, precision: str) -> Any:
    """The ``BitsAndBytesConfig`` for ``precision`` (``None`` for fp32); the task head stays unquantized."""
    check_precision(spec, precision)
    if precision == "fp32":
        return None
    require_bitsandbytes(precision)
    import torch
    from transformers import BitsAndBytesConfig

    skip = skip_patterns(spec.quant_skip_modules) or None
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # float32 compute: LoRA adapters, the head and the loss all stay float32 on CPU.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def _quant_identity(spec: ModelSpec, precision: str) -> dict[str, Any]:
    if precision == "fp32":
        return {}
    settings: dict[str, Any] = {"skip": list(spec.quant_skip_modules)}
    if precision == "nf4":
        settings.update(quant_type="nf4", compute_dtype="float32")
    return settings


# -- identity and keys ----------------------------------------------------------------------------------
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _files_identity(folder: Path) -> list[tuple[str, int, int]]:
    entries = []
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        stat = path.stat()
        entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return entries


def _source_identity(spec: ModelSpec) -> dict[str, Any]:
    gguf = spec.resolve_gguf()
    if gguf is not None:
        stat = gguf.stat()
        return {
            "kind": "gguf",
            "path": str(gguf.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "gguf": _version("gguf"),
        }
    source = spec.resolve_checkpoint()
    folder = Path(source)
    if folder.is_dir():
        return {"kind": "folder", "path": str(folder.resolve()), "files": _files_identity(folder)}
    return {"kind": "hub", "id": source}


def _identity(spec: ModelSpec, precision: str) -> dict[str, Any]:
    versions = {name: _version(name) for name in ("torch", "transformers", "safetensors")}
    if precision != "fp32":
        versions["bitsandbytes"] = _version("bitsandbytes")
    return {
        "format": CACHE_FORMAT,
        "spec": spec.name,
        "precision": precision,
        "source": _source_identity(spec),
        "quantization": _quant_identity(spec, precision),
        "versions": versions,
    }


def cache_key(spec: ModelSpec, precision: str) -> str:
    """The entry name for ``spec`` at ``precision``: ``<precision>-<16 hex digits of the identity hash>``."""
    check_precision(spec, precision)
    blob = json.dumps(_identity(spec, precision), sort_keys=True).encode()
    return f"{precision}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _entry_path(spec: ModelSpec, precision: str) -> Path:
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", spec.name) or "model"
    return checkpoints_dir() / folder / cache_key(spec, precision)


def _is_complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def cached_checkpoint(spec: ModelSpec, precision: str) -> Path | None:
    """The prepared entry for ``spec`` at ``precision`` if it is already in the cache (no work done)."""
    entry = _entry_path(spec, precision)
    return entry if _is_complete(entry) else None


def discard_checkpoint(entry: Path) -> None:
    """Remove a cache entry (e.g. one that failed to load); the next prepare rebuilds it."""
    entry = Path(entry)
    if not entry.exists():
        return
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(entry, trash)  # atomic: no reader sees a half-deleted entry
    except OSError as exc:
        log.warning("could not discard cache entry %s: %s", entry, exc)
        return
    shutil.rmtree(trash, ignore_errors=True)


# -- building entries -----------------------------------------------------------------------------------
def float32_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keyword for float32 weights (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _drop_quantization_config(config: Any) -> None:
    # The pitfall: a model re-saved from a GGUF load keeps `quantization_config: {quant_method: gguf}`,
    # and transformers then refuses to combine it with a BitsAndBytesConfig.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("_pre_quantization_dtype",):
        if hasattr(config, attr):
            delattr(config, attr)


def _convert_gguf(spec: ModelSpec, out: Path) -> None:
    """Dequantize the spec's GGUF file once and save it as an ordinary safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.resolve_gguf()
    if gguf is None:  # pragma: no cover - callers check
        raise CheckpointCacheError(f"{spec.name}: GGUF file {spec.gguf_file!r} not found")
    log.info("converting %s from %s (once; later loads use the cache)", spec.name, gguf)
    # transformers draws a tqdm bar over the GGUF tensors whatever its own progress-bar setting says.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **float32_kwargs())
    config = copy.deepcopy(loaded.config)
    _drop_quantization_config(config)
    config._name_or_path = spec.hub_id or spec.name
    # A fresh model (no GGUF loader state) that takes the dequantized tensors without a copy.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, **float32_kwargs())
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    del loaded
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        del saved["quantization_config"]
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _quantize(spec: ModelSpec, precision: str, out: Path) -> None:
    """Quantize the spec's backbone with bitsandbytes and save it in quantized form plus the tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    qconfig = quantization_config(spec, precision)
    source = source_checkpoint(spec)
    log.info("quantizing %s to %s from %s (once; later loads use the cache)", spec.name, precision, source)
    # The backbone only: each load adds a fresh task head of the size its task needs.
    model = AutoModel.from_pretrained(source, quantization_config=qconfig, low_cpu_mem_usage=True, **float32_kwargs())
    model.save_pretrained(out, safe_serialization=True)
    del model
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if saved.get("quantization_config", {}).get("quant_method") != "bitsandbytes":
        raise CheckpointCacheError(f"{spec.name}: the saved {precision} checkpoint has no bitsandbytes config")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale(parent: Path) -> None:
    now = time.time()
    for child in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - child.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(child, ignore_errors=True)
    for child in parent.glob(".trash-*"):
        shutil.rmtree(child, ignore_errors=True)


def _build_entry(spec: ModelSpec, precision: str, build: Callable[[Path], None]) -> Path:
    entry = _entry_path(spec, precision)
    if _is_complete(entry):
        return entry
    _quiet_transformers()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(entry.parent)
        if entry.exists():  # a folder without the marker was not written by us: do not trust it
            discard_checkpoint(entry)
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointCacheError(f"cannot write the checkpoint cache {entry.parent}: {exc}") from exc
    started = time.perf_counter()
    try:
        build(tmp)
        meta = _identity(spec, precision)
        meta["seconds"] = round(time.perf_counter() - started, 2)
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _is_complete(entry):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same entry first
            return entry
        _fsync_dir(entry.parent)
    except FFMError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointCacheError(f"cannot prepare the {precision} checkpoint of {spec.name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s %s in %.1f s: %s", spec.name, precision, time.perf_counter() - started, entry)
    return entry


# -- public entry points ------------------------------------------------------------------------------
def source_checkpoint(spec: ModelSpec) -> str:
    """Where to load ``spec``'s full-precision weights from: a local folder or a hub id.

    For a spec whose local checkpoint is a GGUF file this is the cached conversion (built on first use);
    otherwise it is :meth:`ModelSpec.resolve_checkpoint`.
    """
    if spec.resolve_gguf() is not None:
        return str(_build_entry(spec, "fp32", lambda out: _convert_gguf(spec, out)))
    return spec.resolve_checkpoint()


def prepare_checkpoint(spec: ModelSpec, precision: str = "fp32") -> Path:
    """A local folder holding ``spec``'s base at ``precision``, built into the cache on first use.

    ``fp32``: the GGUF conversion for GGUF specs, the checkpoint's own folder when it is local, or the hub
    snapshot otherwise. ``int8`` / ``nf4``: the bitsandbytes-quantized backbone plus the tokenizer. Raises
    :class:`ConfigError` for a precision the spec cannot use and :class:`CheckpointCacheError` when the
    entry cannot be built or written (the caller can still load without the cache).
    """
    check_precision(spec, precision)
    if spec.family != "hf-sequence-classification":
        raise ConfigError(f"model {spec.name} (family {spec.family}) has no prepared checkpoints")
    if precision != "fp32":
        quantization_config(spec, precision)  # fail early, as ConfigError, when bitsandbytes is missing
        return _build_entry(spec, precision, lambda out: _quantize(spec, precision, out))
    source = source_checkpoint(spec)
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as exc:
        raise CheckpointCacheError(f"cannot fetch {spec.name} from the hub ({source!r}): {exc}") from exc
