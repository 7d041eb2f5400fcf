"""`specdec serve`: an OpenAI-compatible HTTP server with speculation inside continuous
batching (`service` runs the model, `app` speaks HTTP)."""
