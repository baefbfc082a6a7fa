"""
A Django site in one file (docs/one-file.md): C{twistd -n lrp --app hello.py[:NAME]},
or C{python hello.py} for a file that calls L{serve}.
"""

__all__ = ["Router", "serve"]


def __getattr__(name):
    # Imported on first use: the option parser imports this package, the router Django.
    if name == "Router":
        from twistedlrp.onefile.router import Router

        return Router
    if name == "serve":
        from twistedlrp.onefile.runner import prepare_script, serve

        prepare_script()
        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
