"""Talking to the endpoint: the one CoAP transport, the uplink, the link monitor, device
state, edge/cloud routing, and the backoff they share.
"""
