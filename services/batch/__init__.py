"""Batch jobs: the OpenAI Files and Batch API (``/v1/files``, ``/v1/batches``) on a durable queue
(huey over SQLite or Redis), whose workers run each line through the router's own handlers."""
