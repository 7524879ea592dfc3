"""agents: query agents that reason, then embed, and the command line (``searchr3``)."""
