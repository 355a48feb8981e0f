"""What this device can do, probed before the edge SDK picks a training strategy.

A strategy that does not fit the device fails late and expensively (an out-of-memory kill halfway through
a round, a quantized layer that asserts on CPU), so the SDK asks first: how much RAM it may use, how many
cores, which accelerator, and whether the optional back-ends actually work *here* (bitsandbytes int8,
NF4 and 8-bit AdamW; onnxruntime-training).

Two kinds of facts, two lifetimes:

* **Live facts** (RAM, the budget, cores, accelerator memory) are read on every :func:`probe_device`.
* **Capabilities** (does bitsandbytes work, is onnxruntime-training there) are expensive to learn: they
  run tiny layers in a child process, so a crash inside a native library cannot take the app down. They
  are computed once per process and also cached on disk, keyed by the package versions, so a device
  does not re-run them on every start. ``refresh=True`` recomputes them.

The memory budget rule: the budget the app sets (bytes, or a string such as ``"600MB"``) is used as
given; without one the SDK may use :data:`DEFAULT_BUDGET_FRACTION` (80%) of the RAM available when
probed, leaving the rest as headroom for the app and the OS. RAM is clamped to the process's cgroup
memory limit where one is set, so a container is not mistaken for its host.

``python -m ffm_edge.profile [--budget 1.5GiB] [--json] [--refresh]`` prints the profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffm_edge.errors import ConfigError
from ffm_edge.ort.compat import dist_version

__all__ = [
    "CHECK_TIMEOUT_S",
    "DEFAULT_BUDGET_FRACTION",
    "AcceleratorInfo",
    "BackendCheck",
    "DeviceProfile",
    "capability_cache_path",
    "format_bytes",
    "format_profile",
    "main",
    "parse_bytes",
    "probe_device",
]

DEFAULT_BUDGET_FRACTION = 0.8
"""Share of the available RAM the SDK may use when the app sets no budget."""

CHECK_TIMEOUT_S = 180.0
"""Seconds the capability checks may take (importing torch on a slow device is most of it);
``$FFM_PROBE_TIMEOUT`` overrides it."""

_CACHE_SCHEMA = 2  # bump when the checks or the cached fields change meaning
_CACHE_MAX_ENTRIES = 8  # one per interpreter/package set that shares the cache folder
_RESULT_MARKER = "FFM-CHECK-RESULT "  # the child's JSON line, told apart from library chatter
_MAX_ERROR_CHARS = 240


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class AcceleratorInfo:
    """A GPU torch can use: ``kind`` is ``"cuda"`` (also ROCm builds) or ``"mps"``; memory in bytes."""

    kind: str
    name: str
    total_memory_bytes: int | None
    free_memory_bytes: int | None


@dataclass(frozen=True)
class BackendCheck:
    """Whether an optional back-end works on this device, and why not when it does not.

    ``available`` means the package is installed and usable at all; ``int8``, ``nf4`` and ``optim8bit``
    (bitsandbytes only) mean that feature ran correctly in a real check. ``detail`` says what was run
    and, for every failure, the error.
    """

    available: bool
    version: str | None = None
    int8: bool = False
    nf4: bool = False
    optim8bit: bool = False
    detail: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    """What the SDK may use on this device. Sizes are bytes; see the module docstring for the budget rule."""

    total_ram_bytes: int
    available_ram_bytes: int
    budget_bytes: int
    budget_source: str
    cpu_cores: int
    accelerator: AcceleratorInfo | None
    bitsandbytes: BackendCheck
    onnxruntime_training: BackendCheck
    torch_version: str | None
    python_version: str
    platform: str
    ram_source: str
    capabilities_source: str

    @property
    def runtimes(self) -> tuple[str, ...]:
        """Training runtimes usable here: ``torch`` when installed, ``ort`` when onnxruntime-training works."""
        return ("torch",) * (self.torch_version is not None) + ("ort",) * self.onnxruntime_training.available

    @property
    def base_precisions(self) -> tuple[str, ...]:
        """Base-model precisions this device can train on: fp32, plus what bitsandbytes really ran."""
        return ("fp32",) + ("int8",) * self.bitsandbytes.int8 + ("nf4",) * self.bitsandbytes.nf4

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Capabilities:
    bitsandbytes: BackendCheck
    onnxruntime_training: BackendCheck
    source: str


@dataclass(frozen=True)
class _ChildResult:
    """What one checker process gave back: its JSON, or why there is none."""

    data: dict[str, Any] | None
    error: str = ""
    cacheable: bool = True


# --------------------------------------------------------------------------------------------------
# Byte sizes

_UNITS: dict[str, int] = {"": 1, "b": 1, "byte": 1, "bytes": 1}
for _i, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = _UNITS[_letter + "i"] = _UNITS[_letter + "ib"] = 1024**_i
    _UNITS[_letter + "b"] = 1000**_i
_SIZE_RE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_EXAMPLE = (
    "write e.g. '600MB', '1.5GiB' or '2G' (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB powers of 1000)"
)


def parse_bytes(text: str) -> int:
    """Read a size such as ``"600MB"``, ``"1.5GiB"``, ``"2G"`` or ``"1024"`` as a number of bytes.

    Bare letters (``2G``) are binary, as in Docker and the JVM; ``kB/MB/GB`` are decimal. Case does not
    matter. Raises :class:`ConfigError`, with an example, for anything else.
    """
    if not isinstance(text, str):
        raise ConfigError(f"a size must be a string, not {type(text).__name__}; {_SIZE_EXAMPLE}")
    match = _SIZE_RE.match(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ConfigError(f"cannot read {text!r} as a size in bytes; {_SIZE_EXAMPLE}")
    value = float(match.group(1)) * unit
    if not math.isfinite(value):
        raise ConfigError(f"size {text!r} is too large; {_SIZE_EXAMPLE}")
    return round(value)


def format_bytes(n: int) -> str:
    """Show a byte count with a binary unit and one decimal (``1.5 GiB``), for reports and logs."""
    sign, size = ("-" if n < 0 else ""), float(abs(n))
    if size < 1024:
        return f"{sign}{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{sign}{size:.1f} {unit}"


def _resolve_budget(budget: int | str | None, available: int) -> tuple[int, str]:
    """Apply the budget rule: the app's budget as given, else a fraction of the available RAM."""
    if budget is None:
        share = round(DEFAULT_BUDGET_FRACTION * 100)
        return int(available * DEFAULT_BUDGET_FRACTION), f"default: {share}% of available RAM"
    if isinstance(budget, bool) or not isinstance(budget, int | str):
        raise ConfigError(f"budget must be bytes (int) or a size string, not {type(budget).__name__}")
    value = parse_bytes(budget) if isinstance(budget, str) else budget
    if value <= 0:
        raise ConfigError(f"budget must be positive, got {budget!r}; {_SIZE_EXAMPLE}")
    return value, "set by the app"


# --------------------------------------------------------------------------------------------------
# Live facts: RAM, cores, accelerator


def _host_memory() -> tuple[int, int, str]:
    """Total and available RAM of the host: psutil, else /proc/meminfo, else sysconf."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available), "psutil"
    except Exception:  # missing, or broken on an odd platform
        pass
    try:
        fields: dict[str, int] = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * 1024  # the kernel reports kB (KiB)
        avail = fields.get("MemAvailable", fields.get("MemFree", 0) + fields.get("Cached", 0))
        return fields["MemTotal"], avail, "/proc/meminfo"
    except (OSError, KeyError, ValueError):
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page, "sysconf"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and garbage read as None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The cgroup folders that bound this process for ``controller``, innermost first."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    dirs: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            base = root
        elif controller in controllers.split(","):  # cgroup v1
            base = next((root / n for n in (controllers, controller) if (root / n).is_dir()), root / controller)
        else:
            continue
        leaf = base / rel.strip().lstrip("/")
        dirs += [leaf, *(p for p in leaf.parents if p.is_relative_to(base))]
        dirs.append(base)  # in a container the process's path may not exist; the mount root is its cgroup
    return list(dict.fromkeys(dirs))


def _cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[int, int] | None:
    """The tightest cgroup memory limit over this process and what is left under it, or None.

    Reclaimable page cache (inactive files) counts as free, as the kernel would drop it before an OOM kill.
    """
    limits: list[int] = []
    left: list[int] = []
    for folder in _cgroup_dirs(root, proc_cgroup, "memory"):
        v2 = (folder / "memory.max").exists()
        limit = _read_int(folder / ("memory.max" if v2 else "memory.limit_in_bytes"))
        usage = _read_int(folder / ("memory.current" if v2 else "memory.usage_in_bytes"))
        if limit is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        inactive = _read_stat(folder / "memory.stat", "inactive_file" if v2 else "total_inactive_file")
        limits.append(limit)
        left.append(max(0, limit - max(0, (usage or 0) - inactive)))
    return (min(limits), min(left)) if limits else None


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None when unlimited."""
    quotas: list[int] = []
    for folder in _cgroup_dirs(root, proc_cgroup, "cpu"):
        try:
            quota_text, _, period_text = (folder / "cpu.max").read_text().partition(" ")
            quota, period = (int(quota_text), int(period_text)) if quota_text != "max" else (-1, 1)
        except (OSError, ValueError):
            quota = _read_int(folder / "cpu.cfs_quota_us") or -1  # v1; -1 is no limit
            period = _read_int(folder / "cpu.cfs_period_us") or 1
        if quota > 0 and period > 0:
            quotas.append(max(1, math.ceil(quota / period)))
    return min(quotas) if quotas else None


def _usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, further limited by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def _os_shows_gpu() -> bool:
    """Whether the OS shows a GPU torch could use, so a CPU-only device skips importing torch (seconds)."""
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # Apple silicon: MPS
    if sys.platform.startswith("linux"):
        marks = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg", "/dev/nvgpu")
        return any(os.path.exists(m) for m in marks) or any(Path("/dev").glob("nvhost-ctrl-gpu*"))
    return True  # no cheap way to tell: ask torch


def _accelerator() -> AcceleratorInfo | None:
    """The accelerator torch would train on, with its memory now; torch is imported only if it can matter."""
    if "torch" not in sys.modules and (importlib.util.find_spec("torch") is None or not _os_shows_gpu()):
        return None
    try:
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            return AcceleratorInfo("cuda", torch.cuda.get_device_name(index), int(total), int(free))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            total_mps = getattr(torch.mps, "recommended_max_memory", None)
            used_mps = getattr(torch.mps, "driver_allocated_memory", None)
            mps_total = int(total_mps()) if total_mps else None
            mps_free = max(0, mps_total - int(used_mps())) if mps_total is not None and used_mps else None
            return AcceleratorInfo("mps", "Apple MPS", mps_total, mps_free)
    except Exception:  # a broken driver or torch build means no usable accelerator
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Checks that run inside the child process


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return first_line[:_MAX_ERROR_CHARS]


def _child_check_bitsandbytes() -> dict[str, Any]:
    """Exercise bitsandbytes on this device: int8 and NF4 layers, and 8-bit AdamW. Runs in the child.

    Each layer runs forward and backward to its input (what LoRA on a frozen quantized base needs) and
    must match an fp32 ``nn.Linear`` with the same weights; the weights must really be stored quantized.
    AdamW8bit takes two steps (the first does not yet read its quantized state) and must match torch's
    AdamW and keep uint8 state.
    """
    result: dict[str, Any] = {"available": False, "device": None, "int8": False, "nf4": False, "optim8bit": False}
    errors: dict[str, str] = {}
    result["errors"] = errors
    try:
        import torch

        torch.set_num_threads(1)  # a probe, not a benchmark: stay light on the device
        import bitsandbytes as bnb
    except Exception as exc:
        errors["import"] = _short_error(exc)
        return result
    result["available"] = True
    result["version"] = getattr(bnb, "__version__", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result["device"] = device

    def check_layer(feature: str, layer: Any, stored: torch.dtype, tolerance: float) -> None:
        try:
            torch.manual_seed(0)
            ref = torch.nn.Linear(64, 32).to(device)
            layer.load_state_dict(ref.state_dict())
            layer = layer.to(device)  # bitsandbytes quantizes the weights when they move to a device
            if layer.weight.dtype != stored:
                raise RuntimeError(f"weights stored as {layer.weight.dtype}, expected {stored}")
            x = torch.randn(4, 64, device=device, requires_grad=True)
            y = layer(x).float()
            with torch.no_grad():
                expected = ref(x)
            error = float((y - expected).norm() / expected.norm())
            if not error < tolerance:
                raise RuntimeError(f"output differs from fp32 by {error:.3f} (relative), limit {tolerance}")
            y.sum().backward()
            if x.grad is None or not bool(torch.isfinite(x.grad).all()):
                raise RuntimeError("backward to the input gave no finite gradient")
            result[feature] = True
        except Exception as exc:
            errors[feature] = _short_error(exc)

    for feature, make, stored, tolerance in (
        (
            "int8",
            lambda: bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False, threshold=6.0),
            torch.int8,
            0.05,
        ),
        (
            "nf4",
            lambda: bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4"),
            torch.uint8,
            0.25,
        ),
    ):
        try:
            check_layer(feature, make(), stored, tolerance)
        except Exception as exc:  # the constructor itself failed
            errors[feature] = _short_error(exc)

    try:
        torch.manual_seed(0)
        start = torch.randn(64, 64, device=device)  # 4096 values: bitsandbytes' default min_8bit_size
        param, ref_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        optim, ref_optim = bnb.optim.AdamW8bit([param], lr=1e-2), torch.optim.AdamW([ref_param], lr=1e-2)
        for _ in range(2):
            grad = torch.randn(64, 64, device=device)
            param.grad, ref_param.grad = grad.clone(), grad.clone()
            optim.step()
            ref_optim.step()
        state = optim.state[param].get("state1")
        if state is None or state.dtype != torch.uint8:
            raise RuntimeError(f"optimizer state is {getattr(state, 'dtype', None)}, not 8-bit")
        moved, ref_moved = param.detach() - start, ref_param.detach() - start
        error = float((moved - ref_moved).norm() / ref_moved.norm())
        if not error < 0.15:
            raise RuntimeError(f"update differs from torch AdamW by {error:.3f} (relative), limit 0.15")
        result["optim8bit"] = True
    except Exception as exc:
        errors["optim8bit"] = _short_error(exc)
    return result


_ORT_TRAINING_CLASSES = ("Module", "Optimizer", "CheckpointState")


def _child_check_onnxruntime_training() -> dict[str, Any]:
    """Load onnxruntime's on-device training API the way the ORT runtime does, with torch blocked. Runs in the child.

    ``onnxruntime.training`` imports torch, which would cost seconds and gigabytes on a device that
    trains with onnxruntime instead; so torch is blocked, and the API is loaded as
    :func:`ffm_edge.ort.compat.load_training_api` loads it (the wrappers, without the package
    ``__init__``). The tokenizer library the runtime needs is checked too.
    """
    sys.modules["torch"] = None  # type: ignore[assignment]  # any import of torch now fails at once
    version = dist_version("onnxruntime-training-cpu", "onnxruntime-training")
    result: dict[str, Any] = {"available": False, "version": version}
    if importlib.util.find_spec("onnxruntime") is None:
        result["detail"] = "onnxruntime-training is not installed (pip install 'ffm[ort]')"
        return result
    try:
        from onnxruntime.capi import _pybind_state
    except Exception as exc:
        result["detail"] = f"importing onnxruntime's native bindings failed: {_short_error(exc)}"
        return result
    missing = [name for name in _ORT_TRAINING_CLASSES if not hasattr(_pybind_state, name)]
    if "Module" in missing:
        build = dist_version("onnxruntime", "onnxruntime-gpu")
        result["detail"] = (
            f"onnxruntime {build or version or '(unknown version)'} is an inference-only build "
            "(no training Module); install onnxruntime-training-cpu"
        )
        return result
    try:
        from ffm_edge.ort.compat import load_training_api

        load_training_api()
    except Exception as exc:
        result["detail"] = f"loading the training API without torch failed: {_short_error(exc)}"
        return result
    if importlib.util.find_spec("tokenizers") is None:
        result["detail"] = "the tokenizers package (needed to tokenize text without torch) is not installed"
        return result
    result["available"] = True
    result["version"] = version or dist_version("onnxruntime", "onnxruntime-gpu")
    result["detail"] = "training API loads without torch" + (f" (missing: {', '.join(missing)})" if missing else "")
    return result


# --------------------------------------------------------------------------------------------------
# Running the checks and caching them

_BNB_FEATURES = ("int8", "nf4", "optim8bit")
_CHILD_CHECKS = {"--check-bnb": _child_check_bitsandbytes, "--check-ort": _child_check_onnxruntime_training}


def _run_check_processes(flags: Sequence[str], timeout: float) -> dict[str, _ChildResult]:
    """Run ``python -m ffm_edge.profile <flag>`` for every flag at once; collect each child's JSON line.

    A child that crashes, prints no result or runs past ``timeout`` gives an error instead of a result;
    such a result is not cached, since the cause (an OOM kill, a busy device) may be gone next time.
    """
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)  # works when ffm_edge is vendored, too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    started: dict[str, subprocess.Popen[str] | _ChildResult] = {}
    for flag in flags:
        try:
            started[flag] = subprocess.Popen(
                [sys.executable, "-m", "ffm_edge.profile", flag],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        except OSError as exc:  # e.g. an embedded interpreter without a usable sys.executable
            started[flag] = _ChildResult(None, f"could not start a checker process: {exc}", cacheable=False)
    deadline = time.monotonic() + timeout
    results: dict[str, _ChildResult] = {}
    try:
        for flag, proc in started.items():
            if isinstance(proc, _ChildResult):
                results[flag] = proc
                continue
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                results[flag] = _ChildResult(None, f"check timed out after {timeout:g} s", cacheable=False)
                continue
            results[flag] = _parse_child(proc.returncode, out, err)
    finally:  # interrupted (e.g. Ctrl-C): leave no checker running
        for proc in started.values():
            if isinstance(proc, subprocess.Popen) and proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _parse_child(returncode: int, out: str, err: str) -> _ChildResult:
    for line in reversed(out.splitlines()):
        if line.startswith(_RESULT_MARKER):
            try:
                return _ChildResult(json.loads(line[len(_RESULT_MARKER) :]))
            except json.JSONDecodeError:
                break
    if returncode < 0:
        try:
            why = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            why = f"killed by signal {-returncode}"
    else:
        why = f"exited with code {returncode}"
    last = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "")
    return _ChildResult(None, f"checker process {why}" + (f": {last[:_MAX_ERROR_CHARS]}" if last else ""), False)


def _bitsandbytes_check(child: _ChildResult | None) -> BackendCheck:
    version = dist_version("bitsandbytes")
    if child is None:
        return BackendCheck(False, version, detail="bitsandbytes is not installed")
    if child.data is None:
        return BackendCheck(False, version, detail=child.error)
    data = child.data
    errors: dict[str, str] = data.get("errors", {})
    if not data.get("available"):
        return BackendCheck(False, version, detail=f"import failed: {errors.get('import', 'unknown error')}")
    parts = [f"{f} ok" if data.get(f) else f"{f} failed ({errors.get(f, 'unknown error')})" for f in _BNB_FEATURES]
    return BackendCheck(
        True,
        data.get("version") or version,
        int8=bool(data.get("int8")),
        nf4=bool(data.get("nf4")),
        optim8bit=bool(data.get("optim8bit")),
        detail=f"checked on {data.get('device')}: " + "; ".join(parts),
    )


def _onnxruntime_check(child: _ChildResult | None) -> BackendCheck:
    version = dist_version("onnxruntime-training-cpu", "onnxruntime-training")
    if child is None:
        return BackendCheck(False, version, detail="onnxruntime-training is not installed (pip install 'ffm[ort]')")
    if child.data is None:
        return BackendCheck(False, version, detail=child.error)
    data = child.data
    return BackendCheck(bool(data.get("available")), data.get("version") or version, detail=str(data.get("detail")))


def _probe_timeout() -> float:
    """:data:`CHECK_TIMEOUT_S`, or ``$FFM_PROBE_TIMEOUT`` seconds for slow devices."""
    text = os.environ.get("FFM_PROBE_TIMEOUT")
    if not text:
        return CHECK_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"FFM_PROBE_TIMEOUT must be a positive number of seconds, e.g. 300; got {text!r}")
    return value


def _compute_capabilities() -> tuple[_Capabilities, bool]:
    """Run the checks (children only for what is installed); also say whether the result may be cached."""
    flags = [
        flag
        for flag, module in (("--check-bnb", "bitsandbytes"), ("--check-ort", "onnxruntime"))
        if importlib.util.find_spec(module) is not None
    ]
    timeout = _probe_timeout()
    children = _run_check_processes(flags, timeout) if flags else {}
    caps = _Capabilities(
        _bitsandbytes_check(children.get("--check-bnb")),
        _onnxruntime_check(children.get("--check-ort")),
        source="checked now",
    )
    return caps, all(child.cacheable for child in children.values())


def capability_cache_path() -> Path:
    """Where capability results are kept: ``$FFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ffm``, else ``~/.cache/ffm``."""
    folder = os.environ.get("FFM_CACHE_DIR")
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME")
        folder = str(Path(xdg) / "ffm") if xdg else str(Path.home() / ".cache" / "ffm")
    return Path(folder) / "capabilities.json"


def _cache_key() -> str:
    """What the cached results depend on: interpreter, platform, package versions, GPU presence."""
    facts = {
        "schema": _CACHE_SCHEMA,
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "gpu": _os_shows_gpu(),
        "packages": {
            name: dist_version(name)
            for name in (
                "ffm",
                "torch",
                "bitsandbytes",
                "onnxruntime-training-cpu",
                "onnxruntime-training",
                "onnxruntime",
            )
        },
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("schema") == _CACHE_SCHEMA else {}


def _load_disk_cache(key: str) -> _Capabilities | None:
    path = capability_cache_path()
    entry = _read_cache_file(path).get("entries", {}).get(key)
    try:
        return _Capabilities(
            BackendCheck(**entry["bitsandbytes"]),
            BackendCheck(**entry["onnxruntime_training"]),
            source=f"cached on disk ({path}, {entry['checked_at']})",
        )
    except (TypeError, KeyError):  # missing or written by other code
        return None


def _store_disk_cache(key: str, caps: _Capabilities) -> None:
    """Add this result to the cache file; a cache that cannot be written only costs a re-check."""
    path = capability_cache_path()
    data = _read_cache_file(path)
    entries: dict[str, Any] = data.get("entries", {}) if isinstance(data.get("entries"), dict) else {}
    entries.pop(key, None)
    entries[key] = {
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bitsandbytes": dataclasses.asdict(caps.bitsandbytes),
        "onnxruntime_training": dataclasses.asdict(caps.onnxruntime_training),
    }
    entries = dict(list(entries.items())[-_CACHE_MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".capabilities-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"schema": _CACHE_SCHEMA, "entries": entries}, fh, indent=1)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


_caps_lock = threading.Lock()
_caps: _Capabilities | None = None  # the per-process cache


def _capabilities(refresh: bool) -> _Capabilities:
    """The capabilities, from this process's cache, else the disk cache, else fresh checks."""
    global _caps
    with _caps_lock:  # concurrent probes wait for one set of checks instead of each spawning their own
        if _caps is not None and not refresh:
            return _caps
        key = _cache_key()
        caps = None if refresh else _load_disk_cache(key)
        if caps is None:
            caps, cacheable = _compute_capabilities()
            if cacheable:
                _store_disk_cache(key, caps)
        _caps = caps
        return caps


# --------------------------------------------------------------------------------------------------
# Public entry points


def probe_device(budget: int | str | None = None, *, refresh: bool = False) -> DeviceProfile:
    """Probe this device: live RAM, budget, cores and accelerator, plus the (cached) capability checks.

    ``budget`` is the memory the app lets the SDK use, in bytes or as a size string (``"600MB"``); without
    it the budget is :data:`DEFAULT_BUDGET_FRACTION` of the available RAM. ``refresh=True`` re-runs the
    capability checks instead of using the process or disk cache. Raises :class:`ConfigError` for a bad
    budget (before any probing).
    """
    total, available, ram_source = _host_memory()
    limits = _cgroup_memory()
    if limits is not None and (limits[0] < total or limits[1] < available):
        total, available, ram_source = min(total, limits[0]), min(available, limits[1]), ram_source + " + cgroup limit"
    budget_bytes, budget_source = _resolve_budget(budget, available)
    caps = _capabilities(refresh)
    return DeviceProfile(
        total_ram_bytes=total,
        available_ram_bytes=available,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        cpu_cores=_usable_cores(),
        accelerator=_accelerator(),
        bitsandbytes=caps.bitsandbytes,
        onnxruntime_training=caps.onnxruntime_training,
        torch_version=dist_version("torch"),
        python_version=platform.python_version(),
        platform=platform.platform(),
        ram_source=ram_source,
        capabilities_source=caps.source,
    )


def format_profile(profile: DeviceProfile) -> str:
    """A short report of the profile for people (what ``ffm-edge profile`` prints)."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    bnb, ort, acc = profile.bitsandbytes, profile.onnxruntime_training, profile.accelerator
    if acc is None:
        acc_text = "none (CPU only)"
    else:
        memory = ", ".join(
            f"{format_bytes(v)} {what}"
            for v, what in ((acc.total_memory_bytes, "total"), (acc.free_memory_bytes, "free"))
            if v is not None
        )
        acc_text = f"{acc.kind}: {acc.name}" + (f" ({memory})" if memory else "")
    over = " (above available RAM)" if profile.budget_bytes > profile.available_ram_bytes else ""
    if bnb.available:
        bnb_text = f"{bnb.version}: int8 {yes(bnb.int8)}, nf4 {yes(bnb.nf4)}, 8-bit AdamW {yes(bnb.optim8bit)}"
        if not (bnb.int8 and bnb.nf4 and bnb.optim8bit):
            bnb_text += f"\n                 {bnb.detail}"
    else:
        bnb_text = f"unavailable: {bnb.detail}"
    ort_text = f"{ort.version}: {ort.detail}" if ort.available else f"unavailable: {ort.detail}"
    lines = [
        "FFM device profile",
        f"  RAM            {format_bytes(profile.total_ram_bytes)} total, "
        f"{format_bytes(profile.available_ram_bytes)} available ({profile.ram_source})",
        f"  budget         {format_bytes(profile.budget_bytes)}{over} ({profile.budget_source})",
        f"  CPU cores      {profile.cpu_cores} usable",
        f"  accelerator    {acc_text}",
        f"  bitsandbytes   {bnb_text}",
        f"  ORT training   {ort_text}",
        f"  runtimes       {', '.join(profile.runtimes) or 'none (install torch, or ffm[ort])'}",
        f"  software       Python {profile.python_version}, torch {profile.torch_version or 'not installed'}",
        f"  platform       {profile.platform}",
        f"  capabilities   {profile.capabilities_source}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ffm_edge.profile``: print the device profile (or, internally, run one capability check)."""
    parser = argparse.ArgumentParser(
        prog="python -m ffm_edge.profile",
        description=(
            "Show what this device offers the FFM edge SDK: RAM and the memory budget, usable CPU cores, "
            "the accelerator, and whether bitsandbytes (int8, NF4, 8-bit AdamW) and onnxruntime-training "
            "work here. Capability checks run once in a child process and are cached on disk "
            f"(now: {capability_cache_path()}; FFM_CACHE_DIR moves it)."
        ),
    )
    parser.add_argument(
        "--budget",
        metavar="SIZE",
        help="memory the SDK may use, e.g. 600MB, 1.5GiB, 2G "
        f"(default: {round(DEFAULT_BUDGET_FRACTION * 100)}%% of available RAM)",
    )
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.add_argument("--refresh", action="store_true", help="re-run the capability checks, ignoring caches")
    for flag in _CHILD_CHECKS:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for flag, check in _CHILD_CHECKS.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            print(_RESULT_MARKER + json.dumps(check()), flush=True)
            return 0
    try:
        profile = probe_device(args.budget, refresh=args.refresh)
    except ConfigError as exc:
        parser.error(str(exc))
    print(json.dumps(profile.to_dict(), indent=2) if args.json else format_profile(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
