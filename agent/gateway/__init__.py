"""The gateway: serving the device protocol to devices behind this one, and the peer state
shared by the gateways of one site (hlc, crdt, peers)."""
