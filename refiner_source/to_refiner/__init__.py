"""Segment -> Refiner: Segment's Webhooks destination in, Refiner's REST API calls out."""
