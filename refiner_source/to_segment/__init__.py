"""Refiner -> Segment: Refiner's webhook and REST API in, Segment's identify, group and track calls out."""
