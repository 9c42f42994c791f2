"""A Kubernetes API on loopback for tests and benchmarks: the emulator, a test
kubelet that runs Pods as local processes, the chart renderer, RBAC grants and
the schema validator."""
