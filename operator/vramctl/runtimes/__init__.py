"""Actuators: where model workloads actually run (docker containers, local processes)."""
