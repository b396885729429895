"""The shared HTTP face of both directions: the app's state (state), bodies (body), tokens and signatures
(auth), webhook counts (counts), health and errors (health)."""
