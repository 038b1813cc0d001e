"""Real Synapse homeservers federating through a real sbg, on loopback."""
