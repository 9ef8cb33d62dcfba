"""What the service accepts: its limits, and the request vocabulary it shares with the library.

The names (methods, criteria, allocations, datasets, formats, ...) come from
`metaprune.vocabulary`, which is torch-free, so the server process (which never imports torch)
and the library accept exactly the same words; workers check them again.
"""

from dataclasses import asdict, dataclass

from metaprune.vocabulary import (  # noqa: F401  (re-exported: the service's vocabulary)
    ALLOCATIONS,
    CRITERIA,
    DATA_CRITERIA,
    DATASETS,
    INPUT_FORMATS,
    MAX_POLICY_BYTES,
    METHODS,
    OPTIMIZERS,
    OUTPUT_FORMATS,
    SCHEDULES,
    TEXT_DATASETS,
)

MiB = 1 << 20
GiB = 1 << 30

# gRPC transport: chunks are at most 1 MiB; a message may never exceed 4 MiB (DESIGN.md §5).
MAX_CHUNK_BYTES = 1 * MiB
MAX_MESSAGE_BYTES = 4 * MiB
MAX_SPEC_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits of one server; exceeding any of them answers RESOURCE_EXHAUSTED.

    Example::

        limits = Limits(max_upload_bytes=64 * MiB, job_time_seconds=600)
    """

    # bytes of one uploaded file (model or data)
    max_upload_bytes: int = 512 * MiB
    # parameter entries of an uploaded model, counted by the validating worker
    max_parameters: int = 100_000_000
    # jobs QUEUED or RUNNING at once, all tenants together
    max_queued_jobs: int = 64
    # address-space limit (RLIMIT_AS) of each worker process
    worker_memory_bytes: int = 4 * GiB
    # wall-clock limit of one job; the worker is killed past it
    job_time_seconds: float = 3600.0
    # wall-clock limit of validating one upload in a worker
    validate_time_seconds: float = 300.0
    # wall-clock limit of receiving one upload (a stalled client must not hold a thread)
    upload_time_seconds: float = 600.0
    # fine-tuning epochs one job may ask for
    max_finetune_epochs: int = 1000
    # bytes one tenant may store (uploads + results); an upload past it is refused
    tenant_quota_bytes: int = 10 * GiB
    # uploads are deleted (file and row) this long after they were made, unless a queued or
    # running job still uses them
    upload_expiry_seconds: float = 7 * 24 * 3600.0
    # finished jobs (row, events and result files) are deleted this long after they finished
    result_expiry_seconds: float = 7 * 24 * 3600.0
    # open streams (WatchJob, DownloadResult, uploads) of one tenant, and of all tenants
    max_streams_per_tenant: int = 128
    max_streams: int = 2048

    def as_dict(self) -> dict:
        return asdict(self)
