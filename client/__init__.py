"""logitcast.client."""
