"""``launch/slurm.sbatch`` run by bash with a fake ``srun``/``scontrol`` first on PATH (SLURM's
variables set as sbatch sets them), and the runtime's SLURM port and GPU choice it relies on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsm_megatron.runtime import detect_launch_env
from wsm_megatron.runtime.distributed import RENDEZVOUS_PORTS, cuda_device_index, slurm_job_port
from wsm_megatron.runtime.termination import SAVED_STATUS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
JOB_ID = "123456"
SLURM = {
    "SLURM_JOB_ID": JOB_ID,
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "8(x2)",
    "SLURM_CPUS_PER_TASK": "16",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
}
RECORDED = ("MASTER_ADDR", "MASTER_PORT", "SRUN_CPUS_PER_TASK", "CUDA_DEVICE_MAX_CONNECTIONS")
# A fake srun records its arguments (one a line) and the environment the tasks would get.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.argv"
env | grep -E '^({names})=' > "$FAKE_LOG/srun.env" || true
exit "${{FAKE_SRUN_STATUS:-0}}"
""".format(names="|".join(RECORDED))
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu003\\ngpu004\\n'; exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol.log"
"""


def run_sbatch(tmp_path, *args, slurm=SLURM, **env_vars):
    """Run the script from the repository root as SLURM would; the fake commands log under
    ``tmp_path/log``. Returns the completed process and that log folder."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SRUN_")) and k not in RECORDED
    }
    env.update(slurm)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PWD=str(REPO),
        PYTHON=sys.executable,
        FAKE_LOG=str(log),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    env.update(env_vars)
    done = subprocess.run(
        ["bash", str(SCRIPT), f"checkpoint.save={tmp_path / 'out' / 'ckpts'}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, log


def srun_call(log):
    argv = (log / "srun.argv").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines())
    return argv, env


def flag(argv, name):
    """The value of ``name`` in srun's arguments, as ``--name value`` or ``--name=value``."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_srun_gets_the_allocation_shape_cpus_and_rendezvous(tmp_path):
    done, log = run_sbatch(tmp_path)
    assert done.returncode == 0, done.stderr
    argv, env = srun_call(log)
    assert flag(argv, "--nodes") == "2" and flag(argv, "--ntasks-per-node") == "8"
    assert flag(argv, "--cpus-per-task") == "16" and env["SRUN_CPUS_PER_TASK"] == "16"
    assert flag(argv, "--gpus-per-task") is None and flag(argv, "--gpu-bind") is None
    assert env["MASTER_ADDR"] == "gpu003" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert int(env["MASTER_PORT"]) == slurm_job_port(int(JOB_ID))
    assert argv[argv.index("python") :][:3] == ["python", "-m", "wsm_megatron.cli.train"]
    assert not (log / "scontrol.log").exists()  # no requeue after a finished run


def test_no_cpus_per_task_without_slurm_cpus_per_task(tmp_path):
    slurm = {k: v for k, v in SLURM.items() if k != "SLURM_CPUS_PER_TASK"}
    done, log = run_sbatch(tmp_path, slurm=slurm)
    assert done.returncode == 0, done.stderr
    argv, env = srun_call(log)
    assert flag(argv, "--cpus-per-task") is None and "SRUN_CPUS_PER_TASK" not in env


def test_gpu_bind_task_asks_one_gpu_per_task(tmp_path):
    done, log = run_sbatch(tmp_path, GPU_BIND="task")
    assert done.returncode == 0, done.stderr
    argv, _ = srun_call(log)
    assert flag(argv, "--gpus-per-task") == "1" and flag(argv, "--gpu-bind") == "per_task:1"


def test_unknown_gpu_bind_is_one_error_line(tmp_path):
    done, log = run_sbatch(tmp_path, GPU_BIND="socket")
    assert done.returncode == 2 and not (log / "srun.argv").exists()
    assert done.stderr.strip().splitlines() == [
        "slurm.sbatch: error: GPU_BIND=socket: expected node or task"
    ]


def test_port_formula_agrees_with_python(tmp_path):
    for job_id in (0, 1, 12767, 12768, 123456, 2**31 - 1):
        done, _ = run_sbatch(tmp_path, slurm={**SLURM, "SLURM_JOB_ID": str(job_id)}, DRY_RUN="1")
        assert done.returncode == 0, done.stderr
        port = int(done.stdout.split("MASTER_PORT=")[1].split()[0])
        assert port == slurm_job_port(job_id) and port in RENDEZVOUS_PORTS
        # A bare srun (no MASTER_PORT) derives the same port in every task.
        env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", **SLURM}
        assert detect_launch_env({**env, "SLURM_JOB_ID": str(job_id)}).master_port == port


def test_slurm_job_port_is_below_the_ephemeral_range():
    assert slurm_job_port(123456) == 20000 + 123456 % 12768 == 28544
    assert {slurm_job_port(j) for j in range(12768)} == set(range(20000, 32768))


def test_dry_run_prints_and_starts_nothing(tmp_path):
    done, log = run_sbatch(tmp_path, DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("+ MASTER_ADDR=gpu003 MASTER_PORT=28544") and " srun --nodes 2" in line
    assert not (log / "srun.argv").exists()


def data_files(tmp_path):
    """A dataset prefix and a tokenizer file, as a container run would mount them."""
    data, tok = tmp_path / "data", tmp_path / "tok"
    data.mkdir()
    tok.mkdir()
    for suffix in (".bin", ".idx"):
        (data / f"web_text_document{suffix}").write_text("")
    (tok / "tokenizer.model").write_text("")
    return [
        f"data.train_data=[0.7, {data / 'web_text_document'}, 0.3, {data / 'web_text_document'}]",
        f"data.tokenizer_model={tok / 'tokenizer.model'}",
    ]


def test_container_mounts_code_data_and_checkpoints(tmp_path):
    done, log = run_sbatch(
        tmp_path, *data_files(tmp_path), CONTAINER="nvcr.io/nvidia/pytorch:25.01"
    )
    assert done.returncode == 0, done.stderr
    argv, _ = srun_call(log)
    assert flag(argv, "--container-image") == "nvcr.io/nvidia/pytorch:25.01"
    assert flag(argv, "--container-workdir") == str(REPO)
    mounts = flag(argv, "--container-mounts").split(",")
    # checkpoint.save's parent (wandb's default folder) holds checkpoint.save: one mount
    for path in (REPO, tmp_path / "out", tmp_path / "data", tmp_path / "tok"):
        assert f"{path}:{path}" in mounts
    assert len(mounts) == 4
    assert (tmp_path / "out" / "ckpts").is_dir()  # created before srun


def test_given_container_mounts_are_used_as_is(tmp_path):
    done, log = run_sbatch(
        tmp_path, CONTAINER="img", CONTAINER_MOUNTS="/lustre:/lustre:ro", PYTHON="false"
    )
    assert done.returncode == 0, done.stderr  # no config read on this host (PYTHON=false)
    argv, _ = srun_call(log)
    assert flag(argv, "--container-mounts") == "/lustre:/lustre:ro"


@pytest.mark.parametrize("missing", ["data", "tokenizer"])
def test_container_input_missing_is_one_error_line(tmp_path, missing):
    overrides = data_files(tmp_path)
    if missing == "data":
        (tmp_path / "data" / "web_text_document.idx").unlink()
        key, path = "data.train_data", tmp_path / "data" / "web_text_document.idx"
    else:
        (tmp_path / "tok" / "tokenizer.model").unlink()
        key, path = "data.tokenizer_model", tmp_path / "tok" / "tokenizer.model"
    done, log = run_sbatch(tmp_path, *overrides, CONTAINER="img")
    assert done.returncode == 2 and not (log / "srun.argv").exists()
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"slurm.sbatch: error: {key}: {path} does not exist (needed inside the container)"
    ]


def test_invalid_config_stops_before_srun(tmp_path):
    done, log = run_sbatch(tmp_path, "train.lr=-1")
    assert done.returncode == 2 and not (log / "srun.argv").exists()
    assert "wsm-train: error:" in done.stderr


@pytest.mark.parametrize(
    "status, extra, requeued",
    [
        (SAVED_STATUS, {}, True),
        (0, {}, False),
        (1, {}, False),
        (SAVED_STATUS, {"REQUEUE": "0"}, False),
    ],
)
def test_requeue_only_after_a_save_on_a_signal(tmp_path, status, extra, requeued):
    done, log = run_sbatch(tmp_path, FAKE_SRUN_STATUS=str(status), **extra)
    assert done.returncode == status, done.stderr
    requeues = (log / "scontrol.log").read_text() if (log / "scontrol.log").exists() else ""
    assert requeues == (f"requeue {JOB_ID}\n" if requeued else "")


def test_script_status_matches_the_trainer():
    assert f"SAVED_ON_SIGNAL_STATUS={SAVED_STATUS}\n" in SCRIPT.read_text()


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [(0, 8, 0), (7, 8, 7), (3, 4, 3), (0, 1, 0), (5, 1, 0)],  # (x, 1): srun --gpus-per-task=1
)
def test_cuda_device_index(local_rank, visible, index):
    assert cuda_device_index(local_rank, visible) == index


def test_cuda_device_index_names_the_binding():
    with pytest.raises(ValueError, match=r"local rank 3 sees 2 GPUs: bind one GPU per task"):
        cuda_device_index(3, 2)
    with pytest.raises(ValueError, match="no GPU"):
        cuda_device_index(0, 0)
