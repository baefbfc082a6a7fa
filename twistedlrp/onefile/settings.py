"""
The settings module of a site given with ``twistd lrp --app`` and no
``--settings`` (L{twistedlrp.onefile.defaults.from_environment}): every
process of the server, the job workers included, sets Django up from it.
"""

from twistedlrp.onefile.defaults import from_environment

globals().update(from_environment())
del from_environment
