"""The loop-owned state machine of one GPU and its parts: each tick observes,
plans (``vramctl.planner``) and does one step. Waits (a stop in flight, the
memory, health, Blocked, back-off, an outage) are states re-derived every
tick, never blocking calls. The parts ask the loop only what
``reconcile.context.LoopContext`` names."""
