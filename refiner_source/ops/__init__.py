"""The operator's view and upkeep: the status page, /metrics, alerts, counts, retention."""
