"""Flower Message-API strategies, registered by name in :data:`fedsim.strategy.STRATEGIES`."""
