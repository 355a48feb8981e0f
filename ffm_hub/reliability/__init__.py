"""The fault and attack suite (issue 7): scenarios that attack and break a real hub on real brokers and
count what happened — updates tried, accepted and lost — so reliability is a measured figure.

    ffm-hub reliability                      # every scenario on Mosquitto and amqtt, the figures table
    ffm-hub reliability --only resets,bad_inputs --brokers mosquitto

The pytest suite (``tests/test_reliability_*.py``) runs the same scenarios and asserts on their
outcomes; :mod:`ffm_hub.reliability.outcome` says what a scenario and an outcome are.
"""

from ffm_hub.reliability.outcome import BROKERS, Context, Outcome, Scenario

__all__ = ["BROKERS", "Context", "Outcome", "Scenario"]
