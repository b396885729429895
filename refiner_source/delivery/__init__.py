"""One delivery loop for every destination: claims, the lease, backoff and Retry-After, dead letters, SIGTERM."""
