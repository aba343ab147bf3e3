"""The orchestration layer: CLI, config, driver, Ray Data stages, graph refresh."""
