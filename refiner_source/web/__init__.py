"""The shared HTTP face of both directions: body reading and limits, tokens, errors, health, the app's state."""
