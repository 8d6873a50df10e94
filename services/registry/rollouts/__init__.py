"""Rollouts and experiments in the registry: plans and their guardrails, experiments and their statistics,
feature flags, the durable traffic configuration routers watch, and the controller that moves plans along."""
