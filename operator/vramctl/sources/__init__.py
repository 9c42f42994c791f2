"""Where desired state comes from and status goes to: state file, compose events, Kubernetes."""
