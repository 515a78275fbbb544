"""The command line: `trainpilot run` and its report, progress and history, and the entry point
that starts the operator. One of the two callers of the agent loop (the other is controller/)."""
