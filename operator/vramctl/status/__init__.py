"""The status vocabulary, pure: phases, progress and switch records (book),
conditions shaped like ``metav1.Condition``, and secret redaction."""
