"""Python client for the ropeserve gateway."""
