"""logitcast.trainer."""
