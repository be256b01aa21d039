"""logitcast.protos."""
