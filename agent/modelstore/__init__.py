"""Models on the device: signing and manifests, the download over the one CoAP transport,
the LRU cache, and assignment of models to roles.
"""
