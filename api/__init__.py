"""The reading queue: an HTTP API and a dashboard over the drafts (FastAPI, served by uvicorn)."""
