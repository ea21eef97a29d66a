"""Runtime glue: NATS connections, stream topology, the embedded nats-server, logging."""
