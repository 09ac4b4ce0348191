"""Media plane: the single UDP socket and everything a packet meets on its way through."""
