"""A local teacher fleet: Ray started here, Ray Serve's gRPC proxy, N teacher replicas.

`LocalFleet.up(...)` is what `logitcast fleet up`, the fleet tests and
`bench/fleet.py` use: it sets `RAY_AUTH_MODE=disabled` unless set (local
runs), gives Ray a short temp dir of its own (Unix socket paths are limited
to ~107 bytes), starts Serve with the proxy ports in the first `serve.start`
(later calls cannot change them), deploys `ray_app.TeacherDeployment` and
waits until the proxy answers `Info`. `down()` deletes the app (replicas drain
and flush their cache tee), shuts Serve and Ray down and removes the temp dir.
On a cluster, use `serve deploy deploy/serve.yaml` against a running Ray
instead; nothing here is needed there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFleet:
    """A running local fleet; build with `LocalFleet.up(...)`."""

    def __init__(self, address: str, temp_dir: Path, owns_ray: bool) -> None:
        self.address, self.temp_dir, self._owns_ray = address, temp_dir, owns_ray

    @classmethod
    def up(cls, replica: dict | None = None, *, replicas: int = 1,
           autoscale: tuple[int, int] | None = None, max_ongoing_requests: int = 16,
           num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0,
           grpc_port: int = 0, http_port: int = 0, host: str = "127.0.0.1",
           num_cpus: int | None = None, temp_dir: str | Path | None = None,
           timeout_s: float = 300.0) -> LocalFleet:
        """replica: `ReplicaConfig` fields. autoscale: (min, max) replicas instead of a
        fixed number. Ports 0 pick free ones."""
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        from ray import serve

        from logitcast.server.ray_app import (
            APP_NAME,
            SERVICER_FUNCTIONS,
            ReplicaConfig,
            TeacherDeployment,
        )

        config = ReplicaConfig(**(replica or {}))
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        tmp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="lc-ray-", dir="/tmp"))
        grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(_temp_dir=str(tmp), include_dashboard=False, num_cpus=num_cpus,
                     log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": host, "port": http_port},
                    grpc_options={"port": grpc_port,
                                  "grpc_servicer_functions": SERVICER_FUNCTIONS})
        options: dict = {"max_ongoing_requests": max_ongoing_requests,
                         "ray_actor_options": {"num_cpus": num_cpus_per_replica,
                                               "num_gpus": num_gpus_per_replica}}
        if autoscale is not None:
            lo, hi = autoscale
            options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                             "target_ongoing_requests": 2}
        else:
            options["num_replicas"] = replicas
        app = TeacherDeployment.options(**options).bind(asdict(config))
        serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}", blocking=False)
        fleet = cls(f"{host}:{grpc_port}", tmp, owns_ray)
        fleet._app = (TeacherDeployment, options, asdict(config))
        fleet._wait_ready(APP_NAME, timeout_s)
        return fleet

    def scale(self, replicas: int, timeout_s: float = 300.0) -> None:
        """Redeploy with a fixed number of replicas; returns once all of them run."""
        from ray import serve

        from logitcast.server.ray_app import APP_NAME, DEPLOYMENT_NAME

        deployment, options, config = self._app
        options = {k: v for k, v in options.items() if k != "autoscaling_config"}
        options["num_replicas"] = replicas
        serve.run(deployment.options(**options).bind(config), name=APP_NAME,
                  route_prefix=f"/{APP_NAME}", blocking=False)
        self._app = (deployment, options, config)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
            if status.replica_states.get("RUNNING", 0) == replicas and \
                    sum(status.replica_states.values()) == replicas:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{replicas} replicas not running after {timeout_s:.0f}s")

    def _wait_ready(self, app: str, timeout_s: float) -> None:
        import grpc

        from logitcast.protos import teacher_pb2 as pb
        from logitcast.protos import teacher_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout_s
        last = None
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.TeacherStub(channel)
            while time.monotonic() < deadline:
                try:
                    self.info = stub.Info(pb.InfoRequest(), timeout=5,
                                          metadata=[("application", app)])
                    return
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                    time.sleep(0.5)
        self.down()
        raise TimeoutError(f"the fleet's gRPC proxy at {self.address} did not answer Info "
                           f"within {timeout_s:.0f}s (last: {last})")

    def down(self) -> None:
        import ray
        from ray import serve

        from logitcast.server.ray_app import APP_NAME

        try:
            serve.delete(APP_NAME)  # replicas run __del__: drain, flush the tee
            serve.shutdown()
        finally:
            if self._owns_ray:
                ray.shutdown()
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
