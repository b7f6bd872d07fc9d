"""The OpenAI-compatible HTTP front end (trusted side): schemas, routes, SSE, errors, metrics.
It calls the engine's scheduler and nothing below it."""
