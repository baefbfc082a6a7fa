"""
A .tac deployment of the twistedlrp demo site::

    twistd -ny conf/lrp.tac                # in the foreground
    twistd -y conf/lrp.tac                 # as a daemon (twistd.pid, twistd.log)

A .tac file is Python that twistd runs to get an ``application``: everything
``twistd lrp`` does is available through ``twistedlrp.make_service()``, whose
keyword arguments are the long option names with underscores
(``graceful_timeout=30``), with the same defaults and checks. Django is set
up when ``make_service`` returns, before twistd daemonizes or the reactor
runs; an error ends twistd with a message.

This file serves the demo site in ``example/`` (migrate it first:
``python example/manage.py migrate``). The environment variables below only
make the example reusable; a real .tac usually spells its values out. Add
other services to ``application`` as usual: they start and stop with it.
"""

import os

from twisted.application import service

import twistedlrp

HERE = os.path.dirname(os.path.abspath(__file__))
SITE_DIR = os.environ.get("LRP_SITE_DIR", os.path.join(HERE, os.pardir, "example"))

application = service.Application("lrp")

twistedlrp.make_service(
    settings=os.environ.get("DJANGO_SETTINGS_MODULE", "mysite.settings"),
    pythonpath=[os.path.abspath(SITE_DIR)],
    listen=[os.environ.get("LRP_LISTEN", "tcp:8000:interface=127.0.0.1")],
    state_dir=os.environ.get("LRP_STATE_DIR", os.path.join(SITE_DIR, ".lrp")),
    threads=8,
    graceful_timeout=30,
    # Behind nginx (conf/nginx-lrp.conf):
    # proxy_headers=True,
    # no_static=True,
).setServiceParent(application)
