"""The worker: one actor per GPU (an inbox, one loop thread, a published
snapshot), its reporter (status, conditions, switch records), and the
supervisor that holds the workers of a host and gates starts made behind
vramctl's back."""
