"""logitcast.cli."""
