"""OpenAI-compatible HTTP server over the continuous-batching engine (`llama3-deploy serve`).

Installed as llama3_deploy.server with the `serve` extra (FastAPI, uvicorn, prometheus-client). It imports
only the runtime, never torch or the export stage. Importing this package has no side effects: the app is
built by `app.create_app(engine, ...)` and run by `cli.run`.
"""
