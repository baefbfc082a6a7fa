"""
A Django site in one file, with no settings module (docs/one-file.md)::

    twistd -n lrp --app hello.py        # or hello.py:index, pkg.module:site
    python hello.py                     # when the file calls twistedlrp.serve()

The file names a view, a L{Router}, a list of URL patterns or a WSGI
application (a nanodjango app too). Its jobs, hooks and models work as an
installed app's do: every process of the server imports it by its path,
under its module name. The modules: L{spec} (what C{--app} names),
L{defaults} and L{settings} (the settings every process builds from the
environment), L{site} (importing the file in each process), L{router},
L{runner} (C{serve()}: C{python hello.py}), L{urls} (the root URLconf).
"""

__all__ = ["Router", "serve"]


def __getattr__(name):
    # Imported on first use: the option parser imports this package, and
    # the router imports Django.
    if name == "Router":
        from twistedlrp.onefile.router import Router

        return Router
    if name == "serve":
        from twistedlrp.onefile.runner import prepare_script, serve

        prepare_script()
        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
