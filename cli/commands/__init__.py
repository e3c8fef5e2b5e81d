"""One module per `radtriage` subcommand. Each exposes `register(subparsers)`; heavy imports
stay inside the handler so `radtriage --help` stays fast."""
