"""The Stratus gateway: the public HTTP front (port 8080), on the standard
library only. See docs/gateway.md."""
