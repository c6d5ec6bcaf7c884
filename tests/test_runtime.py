"""Launch-environment detection (torchrun, SLURM, single process) and parallel-size checks."""

import os
import signal
import time

import pytest

from wsm_megatron.runtime import ParallelConfig, detect_launch_env, first_slurm_host, termination

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29400",
}
SLURM = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[003-005,9],cpu1",
    "SLURM_JOB_ID": "123456",
}


def test_torchrun_environment():
    env = detect_launch_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 29400, "torchrun")


def test_torchrun_inside_slurm_wins():
    env = detect_launch_env({**SLURM, **TORCHRUN})
    assert env.launcher == "torchrun" and env.rank == 5


def test_slurm_environment_derives_rendezvous():
    env = detect_launch_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (9, 16, 1, "slurm")
    assert env.master_addr == "gpu003"
    assert env.master_port == 20000 + 123456 % 12768


def test_slurm_job_step_of_its_own_meets_on_its_first_node():
    """Two steps on nodes of their own (training, wsm-watch): each meets on its step's first."""
    env = detect_launch_env({**SLURM, "SLURM_STEP_NODELIST": "gpu[005,9]"})
    assert env.master_addr == "gpu005"


def test_slurm_explicit_master_wins():
    env = detect_launch_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("head", 1234)


def test_single_process():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert env.master_port > 0


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("a1,b[2-3]", "a1"),
        ("rack[2-3]-n[07,09]", "rack2-n07"),
        ("x[10]", "x10"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
        ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside world size 8"),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({**TORCHRUN, "LOCAL_RANK": "6"}, "local rank 6 is inconsistent with rank 5"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID not set"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
            "without MASTER_ADDR or SLURM_JOB_NODELIST",
        ),
        ({**SLURM, "SLURM_JOB_NODELIST": "gpu[1-2"}, "cannot parse SLURM_JOB_NODELIST"),
    ],
)
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        detect_launch_env(env)


def test_parallel_sizes():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert cfg.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        cfg.data_parallel_size(6)
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="expert parallel size 4"):
        ParallelConfig(expert_model_parallel_size=4).data_parallel_size(2)


def test_sigterm_inside_a_deferred_section_raises_at_the_safe_point():
    before = signal.getsignal(signal.SIGTERM)
    with termination.stop_on_sigterm():
        with pytest.raises(SystemExit) as stopped:
            with termination.deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, raises nothing
                reached = True
                termination.raise_if_requested()
                reached_after = True
        assert reached and "reached_after" not in locals()
        assert stopped.value.code == 143
        # Outside a deferred section SIGTERM raises at once.
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    termination.raise_if_requested()  # the request ends with stop_on_sigterm
    assert signal.getsignal(signal.SIGTERM) == before
