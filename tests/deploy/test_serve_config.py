"""deploy/serve.yaml is a valid Ray Serve config for our application."""

import importlib
from pathlib import Path

import yaml

SERVE_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def test_serve_yaml_validates_against_ray_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load(SERVE_YAML.read_text()))
    assert [a.name for a in config.applications] == ["logitcast"]


def test_serve_yaml_names_our_servicer_builder_deployment_and_valid_replica_args():
    from logitcast.server.ray_app import (
        APP_NAME,
        DEPLOYMENT_NAME,
        SERVICER_FUNCTIONS,
        ReplicaConfig,
    )

    config = yaml.safe_load(SERVE_YAML.read_text())
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    (app,) = config["applications"]
    assert app["name"] == APP_NAME
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    ReplicaConfig(**app["args"])  # raises on a bad field
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    assert deployment["ray_actor_options"]["num_gpus"] == 1
