"""The demand queue: the pure policy (which model next, anti-thrash, fairness),
the desk (holds and waiting clients, on the worker's side), and the fast
lane (requests for the active model admitted without the inbox)."""
