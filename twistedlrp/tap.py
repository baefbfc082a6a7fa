"""
``twistd lrp``: the options and the service maker behind the dropin in
``twisted/plugins/twistedlrp_plugin.py``.
"""

from __future__ import annotations

from twistedlrp.options import TapOptions as Options

__all__ = ["Options", "makeService", "build_server"]


def makeService(options):
    """
    Set Django up and build the server's service tree (or, with
    C{--reload}, the supervisor that runs the server as a child).

    A failure ends the process with a one-line error and exit code 1.
    """
    if options["reload"]:
        from twistedlrp.reload.supervisor import make_supervisor

        return make_supervisor(options)
    from twistedlrp.boot import BootError

    try:
        return build_server(options)
    except BootError as e:
        raise SystemExit(f"twistd lrp: error: {e}") from None


def build_server(options, reactor=None):
    """
    Run the start-up steps that precede the reactor (DESIGN.md 1 to 3) and
    return the L{twistedlrp.server.LRPServer}.

    @raise twistedlrp.boot.BootError: Django could not be set up.
    """
    from twistedlrp import boot, threads

    threads.serving_reactor()
    boot.prepare_path(options["pythonpath"])
    boot.configure_settings(options["settings"])
    boot.bridge_stdlib_logging()
    boot.setup_django()
    application = None if options["jobs-only"] else boot.load_wsgi_application()
    boot.import_app_modules("lrp")
    boot.close_connections()

    from twistedlrp.server import LRPServer

    server = LRPServer(options, application, reactor=reactor)
    _add_components(server, options)
    boot.close_connections()
    return server


def _add_components(server, options) -> None:
    """Add the job service and job client, when this build has them."""
    try:
        from twistedlrp.jobs.components import add_job_components
    except ImportError:
        return
    add_job_components(server, options)
