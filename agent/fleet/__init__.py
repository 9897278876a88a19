"""The agent's side of the fleet link: a durable spool for outgoing messages, and portfolio deploy and rollback."""
