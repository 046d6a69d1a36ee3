"""Training the diffusion view (the twins) of an Orthrus model; the AR view stays frozen."""
