"""The device profile: byte sizes, RAM and budget, the capability checks and their caches, the CLI.

The capability checks run for real (bitsandbytes in a child process); onnxruntime-training is not
installed here, so its "unavailable" path is the real one too. Each test that probes points the disk
cache at its own folder and empties the per-process cache, so results never leak between tests or
into the user's ``~/.cache``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ffm_edge import profile as prof
from ffm_edge.errors import ConfigError
from ffm_edge.profile import (
    DEFAULT_BUDGET_FRACTION,
    BackendCheck,
    DeviceProfile,
    capability_cache_path,
    format_bytes,
    format_profile,
    parse_bytes,
    probe_device,
)

GIB = 1024**3


class SpawnCounter:
    """Wraps the real checker-process runner and records every call (the caching tests' hook)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._real = prof._run_check_processes

    def __call__(self, flags: Sequence[str], timeout: float) -> dict[str, prof._ChildResult]:
        self.calls.append(list(flags))
        return self._real(flags, timeout)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SpawnCounter:
    """An empty disk cache in ``tmp_path``, an empty process cache, and a spawn counter."""
    monkeypatch.setenv("FFM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prof, "_caps", None)
    counter = SpawnCounter()
    monkeypatch.setattr(prof, "_run_check_processes", counter)
    return counter


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DeviceProfile, Path]]:
    """One real probe (checks included) shared by the read-only tests, and its cache folder."""
    cache = tmp_path_factory.mktemp("profile-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FFM_CACHE_DIR", str(cache))
        mp.setattr(prof, "_caps", None)
        yield probe_device(), cache


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1024", 1024),
        ("512B", 512),
        ("600MB", 600_000_000),
        ("600mb", 600_000_000),
        ("1.5GiB", 3 * GIB // 2),
        ("1.5 GiB", 3 * GIB // 2),
        ("2G", 2 * GIB),
        ("2g", 2 * GIB),
        ("2Gi", 2 * GIB),
        ("512K", 512 * 1024),
        ("4kB", 4000),
        ("1TB", 10**12),
        ("1T", 1024**4),
        (" 3 bytes ", 3),
        (".5M", 512 * 1024),
        ("1e9", 10**9),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-1GB", "1.2.3G", "GB", "1 G B", "nan", "inf", "1e999"])
def test_parse_bytes_rejects_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match=r"e\.g\. '600MB'"):
        parse_bytes(text)


def test_parse_bytes_rejects_non_strings() -> None:
    with pytest.raises(ConfigError):
        parse_bytes(1024)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (3 * GIB // 2, "1.5 GiB"),
        (600 * 1024**2, "600.0 MiB"),
        (5 * 1024**5, "5120.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [1, 1000, 10**6, 3 * GIB // 2, 7 * 10**9, 3 * 1024**4])
def test_format_bytes_round_trips_within_rounding(n: int) -> None:
    assert abs(parse_bytes(format_bytes(n).replace(" ", "")) - n) <= 0.05 * n


# ---------------------------------------------------------------------------------------------- probing


def test_probe_reports_sane_numbers(probed: tuple[DeviceProfile, Path]) -> None:
    p, _ = probed
    assert p.total_ram_bytes >= p.available_ram_bytes > 0
    assert 0 < p.budget_bytes <= p.available_ram_bytes
    assert p.budget_bytes == int(p.available_ram_bytes * DEFAULT_BUDGET_FRACTION)
    assert "default" in p.budget_source
    assert p.cpu_cores >= 1
    if hasattr(os, "sched_getaffinity"):
        assert p.cpu_cores <= len(os.sched_getaffinity(0))
    assert p.python_version.count(".") == 2
    assert p.platform
    if p.accelerator is not None:  # a GPU machine: its memory must be sane too
        assert p.accelerator.kind in {"cuda", "mps"}


@pytest.mark.parametrize(("budget", "expected"), [(123_456_789, 123_456_789), ("600MB", 600_000_000), ("2G", 2 * GIB)])
def test_explicit_budget_is_honoured(probed: tuple[DeviceProfile, Path], budget: int | str, expected: int) -> None:
    assert probe_device(budget).budget_bytes == expected  # uses the process cache the fixture filled


def test_explicit_budget_above_available_ram_is_honoured_and_flagged(probed: tuple[DeviceProfile, Path]) -> None:
    big = probed[0].available_ram_bytes * 2
    p = probe_device(big)
    assert p.budget_bytes == big
    assert p.budget_source == "set by the app"
    assert "above available RAM" in format_profile(p)


@pytest.mark.parametrize("budget", ["lots", 0, -5, True, 1.5])
def test_bad_budget_is_a_config_error(budget: object) -> None:
    with pytest.raises(ConfigError):
        probe_device(budget)  # type: ignore[arg-type]


def test_bitsandbytes_check_reports_booleans_and_detail(probed: tuple[DeviceProfile, Path]) -> None:
    bnb = probed[0].bitsandbytes
    for flag in (bnb.available, bnb.int8, bnb.nf4, bnb.optim8bit):
        assert isinstance(flag, bool)
    assert bnb.detail
    if bnb.available:
        assert bnb.version
        assert bnb.detail.startswith("checked on ")
        for feature in ("int8", "nf4", "optim8bit"):  # every feature says ok, or why it failed
            assert f"{feature} ok" in bnb.detail or f"{feature} failed (" in bnb.detail
            assert (f"{feature} ok" in bnb.detail) == getattr(bnb, feature)


def test_onnxruntime_training_check_matches_what_is_installed(probed: tuple[DeviceProfile, Path]) -> None:
    ort = probed[0].onnxruntime_training
    if importlib.util.find_spec("onnxruntime") is None:
        assert ort.available is False
        assert "onnxruntime-training" in ort.detail and "not installed" in ort.detail
        assert "ort" not in probed[0].runtimes
    else:  # the ort extra (CI installs it): the real API loads with torch blocked
        assert ort.available is True, ort.detail
        assert "without torch" in ort.detail
        assert "ort" in probed[0].runtimes


def test_profile_is_json_serialisable_and_formats(probed: tuple[DeviceProfile, Path]) -> None:
    p = probed[0]
    data = json.loads(json.dumps(p.to_dict()))
    assert data["total_ram_bytes"] == p.total_ram_bytes
    assert set(data["bitsandbytes"]) >= {"available", "version", "int8", "nf4", "optim8bit", "detail"}
    text = format_profile(p)
    assert text.splitlines()[0] == "FFM device profile"
    for word in ("RAM", "budget", "CPU cores", "accelerator", "bitsandbytes", "ORT training"):
        assert word in text


# ---------------------------------------------------------------------------------------------- caching


def test_capabilities_are_cached_in_process_and_on_disk_and_refresh_recomputes(isolated: SpawnCounter) -> None:
    first = probe_device()
    assert len(isolated.calls) == 1
    assert "--check-bnb" in isolated.calls[0]
    assert first.capabilities_source == "checked now"
    assert capability_cache_path().is_file()

    second = probe_device("1G")
    assert len(isolated.calls) == 1  # the process cache answered
    assert second.bitsandbytes == first.bitsandbytes

    prof._caps = None  # as in a new process: the disk cache answers
    third = probe_device()
    assert len(isolated.calls) == 1
    assert third.capabilities_source.startswith("cached on disk")
    assert (third.bitsandbytes, third.onnxruntime_training) == (first.bitsandbytes, first.onnxruntime_training)

    fourth = probe_device(refresh=True)
    assert len(isolated.calls) == 2
    assert fourth.capabilities_source == "checked now"
    assert fourth.bitsandbytes == first.bitsandbytes  # same device, same answer
    entries = json.loads(capability_cache_path().read_text())["entries"]
    assert len(entries) == 1  # refreshed in place, keyed by the package versions


def test_a_failed_check_is_reported_and_not_cached(isolated: SpawnCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFM_PROBE_TIMEOUT", "0.01")  # no child can import torch that fast
    p = probe_device()
    assert p.bitsandbytes == BackendCheck(False, p.bitsandbytes.version, detail="check timed out after 0.01 s")
    assert not capability_cache_path().exists()  # a transient failure must not stick


def test_a_bad_probe_timeout_is_a_config_error(isolated: SpawnCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FFM_PROBE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="FFM_PROBE_TIMEOUT"):
        probe_device()
    assert isolated.calls == []


def test_cache_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FFM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert capability_cache_path() == tmp_path / "xdg" / "ffm" / "capabilities.json"
    monkeypatch.setenv("FFM_CACHE_DIR", str(tmp_path / "mine"))
    assert capability_cache_path() == tmp_path / "mine" / "capabilities.json"


def test_a_corrupt_cache_file_is_ignored(
    probed: tuple[DeviceProfile, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache_file = tmp_path / "capabilities.json"
    cache_file.write_bytes((probed[1] / "capabilities.json").read_bytes())
    monkeypatch.setenv("FFM_CACHE_DIR", str(tmp_path))
    key = prof._cache_key()
    assert prof._load_disk_cache(key) is not None
    cache_file.write_text("{not json")
    assert prof._load_disk_cache(key) is None


# ---------------------------------------------------------------------------------------------- children


def test_a_crashed_checker_is_reported_with_its_signal() -> None:
    result = prof._parse_child(-11, "", "some warning\nSegmentation fault\n")
    assert result.data is None and not result.cacheable
    assert result.error == "checker process killed by SIGSEGV: Segmentation fault"
    check = prof._bitsandbytes_check(result)
    assert not check.available and "SIGSEGV" in check.detail


def _run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ffm_edge.profile", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _fake_onnxruntime(root: Path, pybind_source: str) -> dict[str, str]:
    """A stand-in onnxruntime package whose native bindings are ``pybind_source``; returns the env to use it."""
    capi = root / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (root / "onnxruntime" / "__init__.py").write_text("")
    (capi / "__init__.py").write_text("")
    (capi / "_pybind_state.py").write_text(pybind_source)
    (capi / "onnxruntime_inference_collection.py").write_text("class OrtValue: ...\n")
    (capi / "onnxruntime_pybind11_state.py").write_text("class SessionOptions: ...\n")
    api = root / "onnxruntime" / "training" / "api"
    api.mkdir(parents=True)
    (api.parent / "__init__.py").write_text("import torch\n")  # like the real one: must not be executed
    (api / "checkpoint_state.py").write_text("class CheckpointState: ...\n")
    (api / "module.py").write_text(
        "from onnxruntime.training.api.checkpoint_state import CheckpointState\nclass Module: ...\n"
    )
    (api / "optimizer.py").write_text("class Optimizer: ...\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_onnxruntime_check_finds_training_classes_without_torch(tmp_path: Path) -> None:
    env = _fake_onnxruntime(tmp_path, "class Module: ...\nclass Optimizer: ...\nclass CheckpointState: ...\n")
    out = _run_module("--check-ort", env=env)
    data = json.loads(out.stdout.split(prof._RESULT_MARKER, 1)[1])
    assert data["available"] is True, data


def test_onnxruntime_check_blocks_torch_and_says_why(tmp_path: Path) -> None:
    env = _fake_onnxruntime(tmp_path, "import torch\nclass Module: ...\n")
    out = _run_module("--check-ort", env=env)
    data = json.loads(out.stdout.split(prof._RESULT_MARKER, 1)[1])
    assert data["available"] is False
    assert "torch" in data["detail"]


def test_onnxruntime_check_recognises_an_inference_only_build(tmp_path: Path) -> None:
    env = _fake_onnxruntime(tmp_path, "class InferenceSession: ...\n")
    out = _run_module("--check-ort", env=env)
    data = json.loads(out.stdout.split(prof._RESULT_MARKER, 1)[1])
    assert data["available"] is False
    assert "inference-only" in data["detail"]


# ---------------------------------------------------------------------------------------------- cgroups


def test_cgroup_v2_limits_clamp_memory_and_cores(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app/worker\n")
    root = tmp_path / "fs"
    leaf, parent = root / "app" / "worker", root / "app"
    leaf.mkdir(parents=True)
    (parent / "memory.max").write_text(f"{2 * GIB}\n")
    (parent / "memory.current").write_text(f"{GIB}\n")
    (parent / "memory.stat").write_text(f"anon 1\ninactive_file {GIB // 4}\n")
    (leaf / "memory.max").write_text("max\n")
    (parent / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    assert prof._cgroup_memory(root, proc) == (2 * GIB, 2 * GIB - (GIB - GIB // 4))
    assert prof._cgroup_cpus(root, proc) == 2


def test_cgroup_v1_and_no_limits(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "fs"
    (root / "memory").mkdir(parents=True)  # in a container the mount root is the container's cgroup
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{GIB // 2}\n")
    (root / "cpu,cpuacct").mkdir()
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert prof._cgroup_memory(root, proc) == (GIB, GIB // 2)
    assert prof._cgroup_cpus(root, proc) is None
    assert prof._cgroup_memory(root, tmp_path / "missing") is None


# ---------------------------------------------------------------------------------------------- CLI


def test_module_prints_json(probed: tuple[DeviceProfile, Path]) -> None:
    out = _run_module("--json", "--budget", "1.5GiB", env={"FFM_CACHE_DIR": str(probed[1])})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["budget_bytes"] == 3 * GIB // 2
    assert data["capabilities_source"].startswith("cached on disk")  # no second check in the child
    assert data["onnxruntime_training"]["available"] is (importlib.util.find_spec("onnxruntime") is not None)


def test_module_rejects_a_bad_budget_and_has_help() -> None:
    out = _run_module("--budget", "lots")
    assert out.returncode == 2 and "e.g. '600MB'" in out.stderr
    helped = _run_module("--help")
    assert helped.returncode == 0 and "--refresh" in helped.stdout and "--check-bnb" not in helped.stdout


def test_base_precisions_follow_the_bitsandbytes_checks(probed: tuple[DeviceProfile, Path]) -> None:
    import dataclasses

    profile, _ = probed
    check = profile.bitsandbytes
    without = dataclasses.replace(profile, bitsandbytes=dataclasses.replace(check, int8=False, nf4=False))
    nf4_only = dataclasses.replace(profile, bitsandbytes=dataclasses.replace(check, int8=False, nf4=True))
    both = dataclasses.replace(profile, bitsandbytes=dataclasses.replace(check, int8=True, nf4=True))
    assert without.base_precisions == ("fp32",)
    assert nf4_only.base_precisions == ("fp32", "nf4")
    assert both.base_precisions == ("fp32", "int8", "nf4")
