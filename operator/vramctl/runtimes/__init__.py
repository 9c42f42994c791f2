"""Where model workloads really run: Docker containers, local processes,
Kubernetes Pods (one ``Runtime`` Protocol), plus the health checks and the
sleep control of each engine's server."""
