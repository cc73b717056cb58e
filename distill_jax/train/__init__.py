"""The training engine: optimiser, state and step, model construction, and the loop."""
