"""Ray Serve only: the deployments (volumes in, predictions out, batched) and the engine that
calls them. Imports `core` and `models`."""
