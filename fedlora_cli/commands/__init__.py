"""One module per subcommand: options -> frozen config -> one core call -> Rich output."""
