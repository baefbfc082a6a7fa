"""Development reload, ``twistd lrp --reload``: L{twistedlrp.reload.supervisor}."""
