"""
twistedlrp: a Twisted application server for Django. Its public surface:
:func:`call_in_reactor`, :func:`make_service` (a ``.tac`` file), :func:`serve`
and :class:`Router` (a site in one file), and the modules
:mod:`twistedlrp.lifecycle`, :mod:`twistedlrp.http` and :mod:`twistedlrp.jobs`.
"""

__version__ = "0.1.0"
__all__ = [
    "Router",
    "ShutdownInProgress",
    "call_in_reactor",
    "make_service",
    "serve",
    "__version__",
]


def __getattr__(name):
    # Imported on first use: a job worker imports this package (its models,
    # its registry) but never the reactor, and Twisted costs it ~15 MiB.
    if name in ("ShutdownInProgress", "call_in_reactor"):
        from twistedlrp import reactor_bridge

        return getattr(reactor_bridge, name)
    if name in ("Router", "serve"):
        from twistedlrp import onefile

        return getattr(onefile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_service(**options):
    """
    Build the server (Django set up) from keyword options named like the
    command line's (C{threads=16}, C{graceful_timeout=10}). For a C{.tac} file::

        application = service.Application("lrp")
        make_service(settings="mysite.settings").setServiceParent(application)

    @return: an L{twisted.application.service.IService}.
    @raise twisted.python.usage.UsageError: an unknown option or a bad value.
    @raise twistedlrp.boot.BootError: Django could not be set up.
    """
    from twistedlrp.options import options_from_kwargs

    return _service_from_options(options_from_kwargs(**options))


def _service_from_options(options):
    if options["migrate"]:
        from twistedlrp.boot import migrate

        migrate(options)
        raise SystemExit(0)
    if options["reload"]:
        from twistedlrp.reload.supervisor import make_supervisor

        return make_supervisor(options)
    from twistedlrp.server import build_server

    return build_server(options)
