"""Canary rollouts of ModelDeployment versions: the state machine (pure) and its metric analysis."""
