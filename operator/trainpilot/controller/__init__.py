"""The kopf operator: thin handlers that hand each experiment to `agent.drive`."""
