"""
The ``lrp`` dropin for ``twistd``: Twisted imports it whenever it scans for
plugins, so it names its service maker by string and imports no reactor.
"""

from twisted.application.service import ServiceMaker

lrp = ServiceMaker(
    "twistedlrp",
    "twistedlrp.tap",
    "Serve a Django site from a thread pool, with worker processes for long jobs.",
    "lrp",
)
