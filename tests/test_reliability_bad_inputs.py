"""Bad inputs and access control (issue 7), on a real Mosquitto and on amqtt.

Each scenario runs once per broker (module-scoped) and the tests below assert on its outcome rows: what
the hub's store took, how its rejection counters moved, and what devices were actually handed by the
broker, never PUBACKs. One more run on an *open* broker shows the access-control counts are not vacuous:
there the same forbidden actions are counted as getting through.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from conftest import require_mosquitto
from hypothesis import given, settings
from hypothesis import strategies as st

from ffm_edge.errors import WrongDtypeError
from ffm_edge.wire import CODECS, SCALE_SUFFIX, decode_payload, quantization_step
from ffm_edge.wire.codec import FORMAT_VERSION
from ffm_hub.brokers import ManagedBroker
from ffm_hub.reliability.bad_inputs import BAD_KINDS, DEFAULT_TRIES, SCENARIOS, access_control, bad_inputs
from ffm_hub.reliability.outcome import Context, Outcome
from ffm_hub.security import BrokerSecurity

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

BROKER_PARAMS = [pytest.param("mosquitto", marks=pytest.mark.mosquitto), "amqtt"]
ACL_CASES = {
    "anonymous_connect",
    "wrong_password",
    "own_uplink_control",
    "subscribe_foreign_downlink",
    "publish_foreign_uplink",
    "publish_foreign_presence",
    "forge_downlink",
    "forge_manifest",
}


def _context(kind: str, folder: Path) -> Context:
    if kind == "mosquitto":
        require_mosquitto()
    return Context(kind, folder, seed=7)


@pytest.fixture(scope="module", params=BROKER_PARAMS)
def bad_rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Outcome]:
    return bad_inputs(_context(request.param, tmp_path_factory.mktemp(f"bad-{request.param}")))


@pytest.fixture(scope="module", params=BROKER_PARAMS)
def acl_rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Outcome]:
    return access_control(_context(request.param, tmp_path_factory.mktemp(f"acl-{request.param}")))


def _by_case(rows: list[Outcome]) -> dict[str, Outcome]:
    return {row.case: row for row in rows}


def test_scenarios_are_exported() -> None:
    assert [s.name for s in SCENARIOS] == ["bad_inputs", "access_control"]
    assert all(s.brokers == ("mosquitto", "amqtt") for s in SCENARIOS)


def test_every_bad_input_is_refused_and_every_control_accepted(bad_rows: list[Outcome]) -> None:
    rows = _by_case(bad_rows)
    assert set(rows) == {"valid_controls", *(kind.name for kind in BAD_KINDS)}
    failed = [f"{r.case}: accepted {r.accepted}/{r.tried} ({r.detail})" for r in bad_rows if not r.passed]
    assert not failed, failed
    controls = rows["valid_controls"]
    assert controls.tried == controls.accepted == DEFAULT_TRIES and controls.lost == 0
    assert controls.metrics["receipts_received"] == DEFAULT_TRIES
    assert controls.metrics["hub_accepted_total"] == DEFAULT_TRIES  # nothing bad slipped in beside them
    for kind in BAD_KINDS:
        assert (rows[kind.name].tried, rows[kind.name].accepted) == (DEFAULT_TRIES, 0), kind.name


def test_each_rejection_is_counted_and_sent_back_with_its_reason(bad_rows: list[Outcome]) -> None:
    rows = _by_case(bad_rows)
    for kind in BAD_KINDS:
        row = rows[kind.name]
        assert row.metrics["counter_delta"] == DEFAULT_TRIES, (kind.name, row.detail)
        assert f"reason {kind.reason}:" in row.detail and "other answers" not in row.detail, row.detail
        assert row.metrics["rejections_received"] == DEFAULT_TRIES, (kind.name, row.detail)
    reasons = {kind.reason for kind in BAD_KINDS}
    assert {"non_finite", "shape_mismatch", "wrong_dtype", "unknown_tensors", "norm_exceeded", "stale"} <= reasons
    assert {"replayed", "bad_signature", "stale_timestamp", "unknown_device", "oversized"} <= reasons


def test_a_secured_broker_refuses_every_forbidden_action(acl_rows: list[Outcome]) -> None:
    rows = _by_case(acl_rows)
    assert set(rows) == ACL_CASES
    failed = [f"{r.case}: accepted {r.accepted}/{r.tried} ({r.detail})" for r in acl_rows if not r.passed]
    assert not failed, failed
    assert rows["own_uplink_control"].accepted == DEFAULT_TRIES
    assert rows["subscribe_foreign_downlink"].tried >= DEFAULT_TRIES  # the hub's receipts to dev-b, seen by dev-b
    for case in ACL_CASES - {"own_uplink_control"}:
        assert rows[case].accepted == 0 and rows[case].tried >= DEFAULT_TRIES, rows[case]
    for case in ACL_CASES - {"anonymous_connect", "wrong_password"}:  # the cases counted after dev-a's markers
        assert rows[case].metrics["markers_accepted"] == 5, rows[case]  # each synchronising update got through


class _OpenBrokerContext(Context):
    """A context whose broker ignores the security it is given: what the counts look like without ACLs."""

    @contextmanager
    def broker_running(self, security: BrokerSecurity | None = None) -> Iterator[ManagedBroker]:
        broker = self.start_broker(None)
        try:
            yield broker
        finally:
            broker.stop()


@pytest.mark.mosquitto
def test_access_control_counts_what_an_open_broker_lets_through(tmp_path: Path) -> None:
    require_mosquitto()
    tries = 3
    rows = _by_case(access_control(_OpenBrokerContext("mosquitto", tmp_path, seed=1), tries=tries))
    assert rows["own_uplink_control"].passed
    for case in ("anonymous_connect", "wrong_password", "publish_foreign_uplink", "forge_downlink", "forge_manifest"):
        assert rows[case].accepted == tries and not rows[case].passed, rows[case]
    assert rows["publish_foreign_presence"].accepted == tries
    leak = rows["subscribe_foreign_downlink"]
    assert leak.tried >= tries and leak.accepted >= leak.tried  # one copy per overlapping subscription


# -- the typed wrong_dtype reason, over every codec and dtype ----------------------------------------------
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_EXPECTED = {"fp32": "F32", "fp16": "F16", "int8": "I8"}


@settings(max_examples=150, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    dtype=st.sampled_from(sorted(_DTYPES)),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    scale_dtype=st.sampled_from(["F32", "F64", "F16"]),
)
def test_a_tensor_of_any_other_dtype_is_typed_wrong_dtype(
    codec: str, dtype: str, shape: tuple[int, ...], scale_dtype: str
) -> None:
    """What the hub turns into ``wrong_dtype``: any stored dtype but the codec's, tensor or int8 scale;
    the declared dtype (with a float32 scale for int8) still decodes."""
    tensors: dict[str, np.ndarray] = {"t": np.ones(shape, _DTYPES[dtype])}
    if codec == "int8":
        scale_shape = quantization_step(np.ones(shape, np.float32)).shape  # the shape the encoder writes
        tensors["t" + SCALE_SUFFIX] = np.ones(scale_shape, _DTYPES[scale_dtype])
    payload = safetensors.numpy.save(tensors, metadata={"ffm_codec": codec, "ffm_format": FORMAT_VERSION})
    if dtype == _EXPECTED[codec] and (codec != "int8" or scale_dtype == "F32"):
        assert decode_payload(payload)[1]["t"].shape == shape
    else:
        with pytest.raises(WrongDtypeError):
            decode_payload(payload)
