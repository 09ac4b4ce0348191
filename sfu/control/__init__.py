"""Control plane: HTTP, signaling, auth. Async and free to allocate; never on the packet path."""
