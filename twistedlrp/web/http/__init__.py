"""twistedlrp's own HTTP/1.1 server: the connection, its reading and writing sides, the request."""
