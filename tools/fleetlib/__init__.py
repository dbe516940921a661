"""The fleet simulator's parts (tools/fleet.py is its command line and library entry point):

- :mod:`fleetlib.coap`: CoAP over UDP for many simulated devices on one socket: message IDs,
  tokens, CON retransmission (RFC 7252 section 4.2), piggybacked and separate responses;
- :mod:`fleetlib.device`: one simulated device: readings, record numbers, unacknowledged records,
  OSCORE protection with the Echo round trip done by hand;
- :mod:`fleetlib.worker`: one worker process, its slice of the fleet in one event loop;
- :mod:`fleetlib.report`: the run's figures (:class:`~fleetlib.report.FleetReport`) and the
  check against the endpoint's storage (:func:`~fleetlib.report.verify`);
- :mod:`fleetlib.provision`: devices and credentials registered in bulk, the credentials file.
"""
