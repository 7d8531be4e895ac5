"""The Ray path's configuration, without starting Ray: flags, settings, Serve options, the builder."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import batcher.adapters.ray as ray_adapter
import pytest
import yaml
from batcher.adapters.ray import RaySettings, add_arguments, maybe_run
from batcher.adapters.ray._autoscale import queue_depth_policy

from batcher import BatchConfig, InvalidRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ray"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_importing_the_package_imports_no_ray() -> None:
    code = "import sys, batcher.adapters.ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_replicas_or_address_the_single_process_server_runs() -> None:
    assert maybe_run(parse(), settings=None) is None


def test_flags_fill_the_settings() -> None:
    args = parse("--replicas", "3", "--devices", "2", "--max-replicas", "5", "--downscale-delay", "10")
    chosen = ray_adapter._cli.ray_settings(args)
    assert chosen == RaySettings(replicas=3, devices=2, max_replicas=5, downscale_delay_s=10.0)


def test_bad_flags_exit_2_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    assert maybe_run(parse("--replicas", "0"), settings=None) == 2
    assert "replicas must be an integer >= 1" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"devices": 1.5}, "devices"),
        ({"min_replicas": 1}, "min_replicas"),
        ({"replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"target_work": 0}, "target_work"),
        ({"downscale_delay_s": -1}, "downscale_delay_s"),
    ],
)
def test_settings_refuse_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        RaySettings(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field


def test_max_ongoing_requests_is_sized_from_the_batcher_not_serves_default() -> None:
    batch = BatchConfig(max_batch_size=48, max_queue=100)
    options = RaySettings(replicas=2, devices=2).deployment_options(batch, gpus=True)
    assert options["max_ongoing_requests"] == 2 * 48 + 100
    assert options["max_queued_requests"] == 100
    assert options["num_replicas"] == 2 and options["ray_actor_options"]["num_gpus"] == 2
    assert options["request_router_config"]["request_router_class"].endswith(":LeastQueuedRouter")
    assert options["graceful_shutdown_timeout_s"] > batch.drain_timeout_s


def test_autoscaling_targets_a_full_batch_per_replica_by_default() -> None:
    options = RaySettings(replicas=2, max_replicas=4).deployment_options(
        BatchConfig(max_batch_size=32), gpus=False
    )
    scaling = options["autoscaling_config"]
    assert "num_replicas" not in options
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 2, 4)
    assert scaling["target_ongoing_requests"] == 32
    assert scaling["policy"]["policy_function"] == "batcher.adapters.ray._autoscale:queue_depth_policy"


class _Config:
    def get_target_ongoing_requests(self) -> float:
        return 16.0


class _Context:
    def __init__(self, replicas: int, work: dict[str, float], total: float = 0.0) -> None:
        self.current_num_replicas = replicas
        self.target_num_replicas = replicas
        self.aggregated_metrics = {"batcher_work": work}
        self.total_num_requests = total
        self.config = _Config()


def test_the_policy_wants_the_work_over_the_target() -> None:
    desired, _ = queue_depth_policy(_Context(2, {"a": 20.0, "b": 28.0}))  # type: ignore[arg-type]
    assert desired == 3.0
    desired, _ = queue_depth_policy(_Context(2, {"a": 4.0, "b": 2.0}))  # type: ignore[arg-type]
    assert desired == 6 / 16
    # A replica that has not reported yet: Serve's own count of ongoing requests stands in.
    desired, _ = queue_depth_policy(_Context(2, {"a": 4.0}, total=40.0))  # type: ignore[arg-type]
    assert desired == 40 / 16


def test_app_builder_takes_flag_names_and_strings() -> None:
    app = ray_adapter.app_builder(
        {"model": "fake", "max-batch-size": "8", "replicas": "2", "max_replicas": "3", "api_key": "1234"}
    )
    replicas = app._bound_deployment.init_args[0]  # Front.bind(replicas, hub, max_body_bytes)
    settings, devices = replicas._bound_deployment.init_args[:2]
    assert settings.batch.max_batch_size == 8 and devices == 1
    assert [k.key for k in settings.api_keys] == ["1234"]
    config = replicas._bound_deployment._deployment_config
    assert config.autoscaling_config.max_replicas == 3 and config.max_ongoing_requests == 8 + 256


def test_app_builder_refuses_unknown_arguments() -> None:
    with pytest.raises(InvalidRequest, match="unknown application argument"):
        ray_adapter.app_builder({"model": "fake", "replicaz": "2"})


@pytest.mark.parametrize("name", ["serve_config.yaml", "kuberay.yaml"])
def test_the_sample_serve_configs_build(name: str) -> None:
    """The sample files are valid Serve configs whose application builds (no Ray started)."""
    from ray.serve.schema import ServeDeploySchema

    loaded = yaml.safe_load((EXAMPLES / name).read_text())
    config = yaml.safe_load(loaded["spec"]["serveConfigV2"]) if "spec" in loaded else loaded
    (app,) = ServeDeploySchema.model_validate(config).applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder(app.args)
    replicas = built._bound_deployment.init_args[0]
    assert (
        replicas._bound_deployment._deployment_config.autoscaling_config.max_replicas
        == app.args["max_replicas"]
    )


def test_the_public_names() -> None:
    assert ray_adapter.__all__ == ["RaySettings", "add_arguments", "app_builder", "build_app", "maybe_run"]
    for name in ray_adapter.__all__:
        assert getattr(ray_adapter, name) is not None
