"""The durable store-and-forward queue: settings, the sequence side file, the database, the
queue API, and the operator's report.
"""
