"""One module per `llamachat` subcommand: `configure(parser)` and `run(args) -> int`."""
