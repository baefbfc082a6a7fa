"""
Every use twistedlrp makes of a private attribute of Twisted or Django, in
one place.

Each has no public API that does the same (the comment at each names the
upstream ticket filed or to file), and each has a test in
C{tests/unit/test_compat_*.py} that fails loudly, naming the internal, when
a new release of Twisted or Django changes it. Nothing else in twistedlrp
touches a private attribute of an object it did not define.
"""

# -- Twisted: listening ports and HTTP -----------------------------------


# -- Twisted: AMP and transports -------------------------------------------


# -- Twisted: the reactor, in a forked process -----------------------------


# -- Django ------------------------------------------------------------------
