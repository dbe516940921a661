"""On-device federated learning of the anomaly autoencoder, without TensorFlow.

A selected device trains the float master weights of the autoencoder on its own normal data
(:mod:`agent.learn.autoencoder`, numpy forward and backward pass, FedProx's proximal term),
clips its weight update and adds Gaussian noise before upload (:mod:`agent.learn.privacy`,
with an accountant over rounds). :mod:`agent.learn.masters` reads the float master weights out
of the float32 TFLite model they ship in.
"""
