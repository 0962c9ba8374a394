"""CPU threads under `accelerate launch`: the CPU configs give them, and the recipe's fallback where none is used."""

from pathlib import Path

import pytest

from had_hf.launch import cpu_threads_per_process

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_DEFAULT = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    "config, processes", [("single_cpu.yaml", 1), ("ddp_2proc_cpu.yaml", 2)], ids=["single", "ddp"]
)
def test_cpu_accelerate_configs_give_each_process_its_cores(config, processes, monkeypatch):
    pytest.importorskip("accelerate")
    import psutil
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)  # a machine of 8 physical cores
    config_file = REPO / "recipes" / "accelerate_configs" / config
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "recipes/distill_glue.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == processes
    assert args.num_cpu_threads_per_process == 8 // processes  # what accelerate exports as OMP_NUM_THREADS


def test_recipe_takes_the_cores_that_accelerate_left_at_one_thread():
    assert cpu_threads_per_process(ACCELERATE_DEFAULT, cpu_count=8, has_accelerator=False) == 8
    two_processes = {**ACCELERATE_DEFAULT, "LOCAL_WORLD_SIZE": "2"}
    assert cpu_threads_per_process(two_processes, cpu_count=8, has_accelerator=False) == 4
    assert cpu_threads_per_process(two_processes, cpu_count=2, has_accelerator=False) is None  # one core each
    # left alone: a GPU machine, a thread count chosen by the user or by a CPU config, a launch without accelerate
    assert cpu_threads_per_process(ACCELERATE_DEFAULT, cpu_count=8, has_accelerator=True) is None
    assert cpu_threads_per_process({**ACCELERATE_DEFAULT, "OMP_NUM_THREADS": "3"}, 8, has_accelerator=False) is None
    assert cpu_threads_per_process({**ACCELERATE_DEFAULT, "ACCELERATE_USE_CPU": "True"}, 8, False) is None
    assert cpu_threads_per_process({"OMP_NUM_THREADS": "1"}, cpu_count=8, has_accelerator=False) is None
