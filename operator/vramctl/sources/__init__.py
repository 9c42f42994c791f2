"""Where desired state comes from and status goes to: the state file (compose
mode) and Kubernetes ModelDeployments (kopf)."""
