"""
The nanodjango internal twistedlrp leans on (twistedlrp.compat's
nanodjango section): the check fails, naming it, when a nanodjango release
changes it. tests/test_onefile.py serves a real nanodjango file.
"""

import inspect

import pytest

nanodjango = pytest.importorskip("nanodjango")


def test_django_app_still_has_an_idempotent_prepare_taking_no_argument():
    prepare = getattr(nanodjango.Django, "_prepare", None)
    assert prepare is not None, "nanodjango.Django._prepare is gone; twistedlrp.compat must follow"
    parameters = list(inspect.signature(prepare).parameters.values())[1:]
    assert all(p.default is not inspect.Parameter.empty for p in parameters), (
        "nanodjango.Django._prepare now needs arguments; twistedlrp.compat must follow"
    )
    # It runs once: the flag it checks is set in __init__.
    assert "self._prepared = False" in inspect.getsource(nanodjango.Django.__init__), (
        "nanodjango.Django no longer keeps _prepared; twistedlrp.compat must follow"
    )
