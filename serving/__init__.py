"""Ray Serve deployments, HTTP API and worklist, the composition root and the CLI."""
