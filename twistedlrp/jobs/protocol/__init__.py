"""What crosses the wire: the AMP commands and operations, their framing, the arguments' checks, the listeners' limits and the AMP front end."""
