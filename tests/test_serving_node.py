"""A client not written in this project: Node.js with @grpc/grpc-js and @grpc/proto-loader, built
from proto/ alone, checks health and calls GetServerInfo (with and without a token)."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from metaprune.serving.process import ServerProcess

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[1]
# npm packages are cached between runs (installing takes ~10 s); one folder per user
NPM_CACHE = Path(tempfile.gettempdir()) / f"metaprune-node-grpc-{os.getuid()}"
PACKAGES = ("@grpc/grpc-js@^1.10", "@grpc/proto-loader@^0.7")

# The standard grpc.health.v1 contract (grpc/grpc-proto), written out for the Node client.
HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""

CLIENT_JS = r"""
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const [address, protoRoot, healthProto, token] = process.argv.slice(2);
const options = {keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true};
const pruning = grpc.loadPackageDefinition(
  loader.loadSync('metaprune/v1/pruning.proto', {...options, includeDirs: [protoRoot]}));
const health = grpc.loadPackageDefinition(loader.loadSync(healthProto, options));
const credentials = grpc.credentials.createInsecure();
const healthClient = new health.grpc.health.v1.Health(address, credentials);
const service = new pruning.metaprune.v1.PruningService(address, credentials);
const withToken = new grpc.Metadata();
withToken.add('authorization', 'Bearer ' + token);
const call = (fn, ...args) => new Promise((resolve) =>
  fn(...args, (error, reply) => resolve(error ? {code: error.code, details: error.details} : reply)));
(async () => {
  const result = {};
  result.health = await call(healthClient.Check.bind(healthClient), {service: ''});
  result.info = await call(service.GetServerInfo.bind(service), {}, withToken);
  result.anonymous = await call(service.GetServerInfo.bind(service), {}, new grpc.Metadata());
  result.unknownJob = await call(service.GetJob.bind(service), {job_id: 'job-nope'}, withToken);
  console.log(JSON.stringify(result));
  process.exit(0);
})();
"""


def _npm_modules() -> Path:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("npm/node not installed: the Node.js client check needs them")
    modules = NPM_CACHE / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir() or not (modules / "@grpc" / "proto-loader").is_dir():
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(NPM_CACHE), *PACKAGES],
                       check=True, capture_output=True, timeout=300)
    return modules


def test_node_client(tmp_path):
    modules = _npm_modules()
    (tmp_path / "health.proto").write_text(HEALTH_PROTO)
    (tmp_path / "client.js").write_text(CLIENT_JS)
    tokens = tmp_path / "tokens"
    tokens.write_text("node-token nodejs\n")
    with ServerProcess(tmp_path / "state", args=("--tokens", str(tokens))) as server:
        out = subprocess.run(
            ["node", str(tmp_path / "client.js"), server.address, str(ROOT / "proto"),
             str(tmp_path / "health.proto"), "node-token"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "NODE_PATH": str(modules)},
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["health"]["status"] == "SERVING"
    info = result["info"]
    assert "metanet" in info["methods"] and "l2" in info["criteria"]
    assert info["limits"]["max_chunk_bytes"] == 1 << 20 and info["auth_required"] is True
    assert result["anonymous"]["code"] == 16  # UNAUTHENTICATED
    assert result["unknownJob"]["code"] == 5  # NOT_FOUND
