"""The HTTP side: the ScaleEngine-compatible endpoint, health and metrics."""
