"""The settings of a site given with ``--app`` and no ``--settings``, in every process."""

from twistedlrp.onefile.defaults import from_environment

globals().update(from_environment())
del from_environment
