"""logitcast.server."""
