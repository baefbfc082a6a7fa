"""
The ``lrp`` dropin for ``twistd``.

Twisted imports every module in this folder whenever it scans for plugins
(``twistd --help`` does), so this module names its service maker by string
and imports neither the reactor nor Django.
"""

from twisted.application.service import ServiceMaker

lrp = ServiceMaker(
    "twistedlrp",
    "twistedlrp.tap",
    "Serve a Django site from a thread pool, with worker processes for long jobs.",
    "lrp",
)
