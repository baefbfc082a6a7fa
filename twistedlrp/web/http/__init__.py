"""
twistedlrp's own HTTP/1.1 server (L{protocol.HTTPConnection} over httptools,
L{request.Request}), meant to replace twisted.web's channel, request and
site on the serving path.
"""
