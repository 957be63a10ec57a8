"""The lean Ray Train set-up of launch/ray_runtime.py: which default callbacks orch drops, and that
the installed Ray still has them (a rename in a Ray upgrade would otherwise bring them back
silently, with their start-up processes). No cluster is started: building a TorchTrainer and its
callback list needs none."""

from __future__ import annotations

import os

import pytest

from launch import ray_runtime


def _callbacks(trainer_class, tmp_path) -> set[str]:  # type: ignore[no-untyped-def]
    from ray.train import RunConfig, ScalingConfig

    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                            run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    return {type(cb).__name__ for cb in trainer._create_default_callbacks()}


@pytest.fixture()
def train_metrics_on(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RAY_TRAIN_METRICS_ENABLED", raising=False)


def test_the_callbacks_orch_drops_exist_in_the_installed_ray(tmp_path, train_metrics_on) -> None:
    from ray.train.torch import TorchTrainer

    default = _callbacks(TorchTrainer, tmp_path)
    assert ray_runtime._LEAN_SKIP <= default, f"Ray Train no longer has {ray_runtime._LEAN_SKIP - default}"


def test_orch_drops_the_cleaner_and_datasets_and_keeps_what_runs_the_job(tmp_path, train_metrics_on) -> None:
    from ray.train.torch import TorchTrainer

    default = _callbacks(TorchTrainer, tmp_path)
    for embedded in (True, False):
        lean = _callbacks(ray_runtime._trainer_class(embedded=embedded), tmp_path)
        assert default - lean == {"DatasetsCallback", "PlacementGroupCleanerCallback"}
        # the torch.distributed set-up, the accelerator and the user's callbacks stay
        assert {"BackendSetupCallback", "AcceleratorSetupCallback", "UserCallbackHandler"} <= lean


def test_embedded_env_names_are_ray_trains_own_and_the_user_setting_wins(monkeypatch) -> None:
    from ray.train.v2._internal import constants

    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR in ray_runtime.EMBEDDED_TRAIN_ENV
    assert constants.METRICS_ENABLED_ENV_VAR in ray_runtime.EMBEDDED_TRAIN_ENV
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.delenv("RAY_TRAIN_METRICS_ENABLED", raising=False)
    ray_runtime._set_embedded_train_env()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "0"
    assert constants.ENV_VARS_TO_PROPAGATE >= {constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR}  # reaches the controller


def test_the_embedded_scaling_policy_sends_no_autoscaler_request(tmp_path, monkeypatch) -> None:
    """Ray Train's FixedScalingPolicy still has the hooks the embedded trainer's policy replaces,
    and the trainer still hands its controller the scaling policy through
    _initialize_and_run_controller; the policy it hands over needs no coordinator actor."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    for name in ("after_controller_start", "_maybe_send_resource_request", "_cancel_resource_request"):
        assert callable(getattr(FixedScalingPolicy, name, None)), f"FixedScalingPolicy.{name} is gone"
    assert callable(getattr(TorchTrainer, "_initialize_and_run_controller", None))
    captured: dict = {}
    # stop at the hand-over to Ray Train: the kwargs its controller would receive
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: captured.update(kwargs))
    trainer = ray_runtime._trainer_class(embedded=True)(
        lambda: None, scaling_config=ScalingConfig(num_workers=2), run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(trainer.scaling_config))
    policy = captured["scaling_policy"]
    assert isinstance(policy, FixedScalingPolicy) and type(policy) is not FixedScalingPolicy
    policy.after_controller_start(None)  # Ray's own would start the coordinator actor (needs a cluster)
    decision = policy.make_decision_for_non_running_worker_group()  # Ray's own asserts its client exists
    assert decision.num_workers == 2
    policy._cancel_resource_request()

    captured.clear()  # on a cluster given by --address, Ray Train's own policy stays
    joined = ray_runtime._trainer_class(embedded=False)(
        lambda: None, scaling_config=ScalingConfig(num_workers=2), run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    joined._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(joined.scaling_config))
    assert type(captured["scaling_policy"]) is FixedScalingPolicy


class _HangsInItsExit:
    """An actor that leaves the cluster but not the machine, as Ray Train's controller did: it
    exits (ray.actor.exit_actor, as the controller does at the end of a run), and its process then
    hangs in Python's exit, on a non-daemon thread that never ends; SIGTERM is ignored."""

    def pid(self) -> int:
        import os

        return os.getpid()

    def exit_and_hang(self) -> None:
        import signal
        import threading
        import time

        import ray

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
        ray.actor.exit_actor()


def test_embedded_shutdown_leaves_no_process_even_a_worker_stuck_in_its_exit(monkeypatch) -> None:
    """A real embedded cluster; one worker made to hang in its exit (as Ray 2.60's controller was
    seen to, deadlocked in its core worker's destructor): shutdown(embedded=True) ends it too."""
    import time

    import psutil
    import ray

    from launch.placement import Workers

    for name in (*ray_runtime.EMBEDDED_TRAIN_ENV, "RAY_TRAIN_V2_ENABLED"):
        monkeypatch.delenv(name, raising=False)  # connect sets them; the other tests get them back as they were
    ray_runtime.connect(None, Workers(num_workers=1, use_gpu=False, backend="gloo"))
    try:
        actor = ray.remote(num_cpus=0)(_HangsInItsExit).remote()
        stuck = ray.get(actor.pid.remote())
        cluster = ray_runtime._embedded_processes()
        assert stuck in {p.pid for p in cluster}
        assert any("raylet" in " ".join(p.cmdline()) for p in cluster)
        actor.exit_and_hang.remote()
        time.sleep(2)
        assert psutil.Process(stuck).is_running()  # gone from the cluster, still on the machine
    finally:
        ray_runtime.shutdown(embedded=True)
    left = [p for p in cluster if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after shutdown: {[(p.pid, p.name()) for p in left]}"
