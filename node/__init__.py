"""node: the daemon, the inference service, the client SDK and routing, and the CLI."""
