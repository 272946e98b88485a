"""The CPU attention worker (a separate process) and the client that drives it."""

from omniserve_sgl.worker.client import CPUAttentionClient, Job, WorkerDiedError, WorkerError

__all__ = ["CPUAttentionClient", "Job", "WorkerDiedError", "WorkerError"]
