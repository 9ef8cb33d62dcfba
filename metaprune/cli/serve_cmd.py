"""`metaprune serve`: run the gRPC pruning service (DESIGN.md §5)."""

import argparse
import os
import signal
import sys
from pathlib import Path

MiB = 1 << 20


def _default_state_dir() -> Path:
    cache = os.environ.get("METAPRUNE_CACHE") or Path.home() / ".cache" / "metaprune"
    return Path(cache) / "serve"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the gRPC pruning service",
        description="Serve metaprune.v1.PruningService (plus grpc.health.v1 and reflection). "
        "Each job runs in its own worker process with memory and time limits.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (non-loopback needs --tokens; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default 50051)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="job store and artifacts (default $METAPRUNE_CACHE/serve)")
    parser.add_argument("--workers", type=int, default=2, help="jobs running at once (default 2)")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--ray-address", default=None, help="run jobs on Ray: 'local' starts a private cluster on 127.0.0.1; "
                        "or 'auto', HOST:PORT, ray://HOST:PORT. A cluster with token authentication "
                        "gets the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    parser.add_argument("--metanet-dir", type=Path, default=None,
                        help="serve the metanetwork checkpoints in this folder (NAME.safetensors + "
                        "NAME.json each); 'default' picks the one whose scope fits the model "
                        "(default: the checkpoints the package ships)")
    parser.add_argument("--tokens", type=Path, default=None, help="file of 'TOKEN TENANT' lines")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key (with --tls-cert)")
    limits = parser.add_argument_group("limits (exceeding one answers RESOURCE_EXHAUSTED)")
    limits.add_argument("--max-upload-mb", type=float, default=512, help="bytes of one upload (default 512 MiB)")
    limits.add_argument("--max-parameters", type=int, default=100_000_000, help="parameters of a model (default 100M)")
    limits.add_argument("--max-queued-jobs", type=int, default=64, help="queued + running jobs (default 64)")
    limits.add_argument("--worker-memory-mb", type=float, default=4096, help="address space of a worker (default 4096)")
    limits.add_argument("--job-time-s", type=float, default=3600, help="wall time of one job (default 3600)")
    limits.add_argument("--max-finetune-epochs", type=int, default=1000, help="epochs one job may ask for")
    limits.add_argument("--upload-time-s", type=float, default=600,
                        help="wall time to receive one upload; slower ones are cancelled (default 600)")
    storage = parser.add_argument_group("storage and streams")
    storage.add_argument("--tenant-quota-mb", type=float, default=10240,
                         help="uploads + results one tenant may store (default 10240 MiB)")
    storage.add_argument("--upload-expiry-s", type=float, default=7 * 86400,
                         help="uploads are deleted this long after upload, unless a queued or running "
                         "job uses them (default 7 days)")
    storage.add_argument("--result-expiry-s", type=float, default=7 * 86400,
                         help="finished jobs and their results are deleted this long after they "
                         "finished (default 7 days)")
    storage.add_argument("--max-streams-per-tenant", type=int, default=128,
                         help="open WatchJob/DownloadResult/upload streams of one tenant (default 128)")
    storage.add_argument("--max-streams", type=int, default=2048,
                         help="open streams of all tenants together (default 2048)")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from metaprune.serving.limits import Limits
    from metaprune.serving.server import PruningServer, ServerConfig

    for name in ("max_upload_mb", "worker_memory_mb", "job_time_s", "max_parameters",
                 "max_queued_jobs", "upload_time_s", "tenant_quota_mb", "upload_expiry_s",
                 "result_expiry_s", "max_streams_per_tenant", "max_streams"):
        if getattr(args, name) <= 0:
            print(f"metaprune serve: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * MiB), max_parameters=args.max_parameters,
        max_queued_jobs=args.max_queued_jobs, worker_memory_bytes=int(args.worker_memory_mb * MiB),
        job_time_seconds=args.job_time_s, max_finetune_epochs=args.max_finetune_epochs,
        upload_time_seconds=args.upload_time_s, tenant_quota_bytes=int(args.tenant_quota_mb * MiB),
        upload_expiry_seconds=args.upload_expiry_s, result_expiry_seconds=args.result_expiry_s,
        max_streams_per_tenant=args.max_streams_per_tenant, max_streams=args.max_streams,
    )
    config = ServerConfig(
        state_dir=args.state_dir or _default_state_dir(), host=args.host, port=args.port,
        workers=args.workers, worker_threads=args.worker_threads, ray_address=args.ray_address,
        tokens_file=args.tokens, metanet_dir=args.metanet_dir, tls_cert=args.tls_cert,
        tls_key=args.tls_key, limits=limits,
    )
    from metaprune.errors import MetaPruneError

    try:  # e.g. a Ray cluster that is not there or refuses our token: one line, no traceback
        server = PruningServer(config)
        port = server.start()
    except MetaPruneError as error:
        print(f"metaprune serve: error: {error}", file=sys.stderr)
        return 2
    print(f"metaprune serve: listening on {args.host}:{port} (state {config.state_dir}, "
          f"{'tokens' if server.auth.required else 'open'}, {server.scheduler.backend.name} backend)",
          flush=True)
    if args.port_file is not None:
        temporary = args.port_file.with_suffix(".tmp")
        temporary.write_text(str(port))
        temporary.replace(args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m metaprune.cli.serve_cmd ...`: the same command without loading the other
    commands' modules (some import torch at import time), for a lean server process."""
    parser = argparse.ArgumentParser(prog="metaprune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
