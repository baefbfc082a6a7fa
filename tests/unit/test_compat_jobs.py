"""
The Perspective Broker internal twistedlrp leans on (twistedlrp.compat's
PB section): the check fails, naming it, when a Twisted release changes it.
"""

import inspect

from twisted.spread import pb

from twistedlrp import compat


def changed(internal: str) -> str:
    return f"Twisted changed {internal}; twistedlrp.compat must follow"


def test_broker_still_finds_a_calls_target_through_the_function_it_is_given():
    recv = getattr(pb.Broker, "_recvMessage", None)
    assert recv is not None, changed("pb.Broker._recvMessage (gone)")
    names = list(inspect.signature(recv).parameters)
    assert names[:5] == ["self", "findObjMethod", "requestID", "objectID", "message"], changed(
        "pb.Broker._recvMessage's arguments"
    )
    assert "findObjMethod(objectID)" in inspect.getsource(recv), changed(
        "how pb.Broker._recvMessage finds a call's target"
    )


def test_a_brokers_call_targets_pass_through_call_target():
    seen = []

    class Base:
        def _recvMessage(self, findObjMethod, requestID, objectID, message, *rest):
            seen.append((findObjMethod(objectID), findObjMethod("missing")))

    class Broker(compat.BrokerCallTargets, Base):
        def call_target(self, target):
            return ("wrapped", target)

    objects = {"avatar": "the avatar"}
    Broker()._recvMessage(objects.get, 1, "avatar", b"submit", 1, (), {})
    assert seen == [(("wrapped", "the avatar"), None)]
