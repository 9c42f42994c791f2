"""The HTTP face: the API, the hold routes, the OpenAI-style gateway and the
status page, every listener built from one set of guards and limits and run
on one event loop that the composition root starts and stops."""
