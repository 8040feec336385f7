import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fenop._cli_parser import DOMAIN_NAMES, PDE_NAMES
from fenop.cli import main
from fenop.data import generate, read_header
from fenop.fem import FunctionSpace, unit_square
from fenop.operators import FEMultigrid, FEOperator
from fenop.train import load_model, read_config, save_checkpoint
from tests.helpers import SMALL_CONFIG as CONFIG
from tests.helpers import (
    child_processes,
    command_line,
    generation_workers,
    sigint_by_default,
    wait_for_samples,
)


def test_generate_then_info(tmp_path, capsys):
    path = tmp_path / "d.h5"
    assert main(["generate", "poisson", "-n", "5", "--resolution", "9", "-o", str(path), "-q"]) == 0
    direct = generate(
        "poisson", 5, unit_square(9), seed=0, path=tmp_path / "direct.h5", progress=False
    )
    with h5py.File(path) as f, h5py.File(direct) as g:
        np.testing.assert_array_equal(f["u"][()], g["u"][()])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 complete" in out and "P1, 81 DOFs" in out and "poisson" in out


def test_generate_a_trajectory_then_info(tmp_path, capsys):
    path = tmp_path / "heat.h5"
    args = ["generate", "heat", "-n", "2", "--resolution", "9", "--steps", "4", "--dt", "0.02"]
    assert main([*args, "-o", str(path), "-q"]) == 0
    with h5py.File(path) as f:
        assert f["u"].shape == (2, 5, 81)
        np.testing.assert_allclose(f["time"][()], [0.0, 0.02, 0.04, 0.06, 0.08], rtol=1e-15)
    assert main(["info", str(path)]) == 0
    assert "5 states from t = 0 to 0.08 (trajectories: u)" in capsys.readouterr().out


def test_generate_on_a_dask_cluster(tmp_path):
    # `fenop generate --scheduler ADDRESS`, the README's cluster path, against a
    # LocalCluster of two worker processes: the file one machine writes
    distributed = pytest.importorskip("distributed", reason="the cluster extra is not installed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        args = ["generate", "darcy", "-n", "5", "--resolution", "9", "-q"]
        path = tmp_path / "cluster.h5"
        assert main([*args, "-o", str(path), "--scheduler", cluster.scheduler_address]) == 0
    direct = generate("darcy", 5, unit_square(9), seed=0, path=tmp_path / "d.h5", progress=False)
    with h5py.File(path) as f, h5py.File(direct) as g:
        for name in ("a", "u"):
            np.testing.assert_array_equal(f[name][()], g[name][()])
    assert read_header(path)["n_complete"] == 5


def test_options_domain_and_mesh_files(tmp_path, capsys):
    path = tmp_path / "l.h5"
    args = f"generate darcy -n 2 --domain lshape --resolution 9 -o {path}".split()
    assert main([*args, "--option", "a_high=20", "-q"]) == 0
    with h5py.File(path) as f:
        assert set(np.unique(f["a"][()])) == {3.0, 20.0}
    mesh_file = tmp_path / "square.vtk"
    unit_square(7).save(str(mesh_file))
    assert (
        main(
            [
                "generate",
                "heat",
                "-n",
                "2",
                "--mesh",
                str(mesh_file),
                "-o",
                str(tmp_path / "h.h5"),
                "-q",
            ]
        )
        == 0
    )


def _status(args) -> int:
    """The exit status, whether main returns it or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("generate darcy -n 2 --mesh {tmp}/none.msh -o {out}", "none.msh': no such file"),
        ("generate darcy -n 2 --mesh {tmp}/m.vtk --resolution 5 -o {out}", "not both"),
        ("generate darcy -n 0 -o {out}", "argument -n/--n-samples: expected a positive integer"),
        ("generate darcy -n 2 -j 0 -o {out}", "argument -j/--workers: expected a positive"),
        ("generate darcy -n 2 --resolution 1 -o {out}", "--resolution: expected an integer of at"),
        ("generate darcy -n 2 --option viscosity=1 -o {out}", "no option 'viscosity'; its"),
        ("generate darcy -n 2 --resolution 2 -o {out}", "all 4 DOFs of this space lie on"),
        ("generate darcy -n 2 --seed -1 -o {out}", "argument --seed: expected an integer of at"),
        ("generate darcy -n 2 -o {tmp}/no/out.h5", "folder {tmp}/no does not exist"),
        ("predict darcy-fno {tmp}/none.h5 -o {tmp}/no/out.h5", "folder {tmp}/no does not"),
        ("predict darcy-fno {tmp}/none.h5 -o {out} --batch-size 0", "a positive integer"),
        ("evaluate darcy-fno {tmp}/none.h5 --plot {tmp}/no/x.png", "folder {tmp}/no does not"),
        # the picture is checked before the store is scored (here, before it is read)
        ("evaluate darcy-fno {tmp}/none.h5 --plot {tmp}/x.xyz", "not a picture format"),
        ("predict darcy-fno {tmp}/none.h5 -o {out} --device tpu", "unknown device 'tpu'"),
        ("evaluate darcy-fno {tmp}", "{tmp}: a directory, not a file"),
        ("generate darcy -n 2 --domain lshape --resolution 8 -o {out}", "odd"),
        ("generate stokes -n 2 -o {out}", "invalid choice: 'stokes'"),
        ("generate darcy -n 2 --option a_high -o {out}", "KEY=VALUE"),
        ("info {tmp}/none.h5", "none.h5: no such file"),
        ("predict darcy-fno {tmp}/none.h5 -o {tmp} --overwrite", "{tmp}: is a folder; name a file"),
        ("generate darcy -n 2 --steps 4 -o {out}", "darcy has no time axis: --steps is for"),
        ("generate heat -n 2 --dt 0.1 -o {out}", "--dt is the step of a trajectory: give --steps"),
        ("generate heat -n 2 --steps 4 --dt 0 -o {out}", "--dt: expected a positive number"),
        ("generate heat -n 2 --steps 2 --option t_final=1 -o {out}", "--steps sets t_final"),
    ],
)
def test_bad_input_is_one_line_with_status_2_and_no_output(tmp_path, capsys, command, message):
    (tmp_path / "m.vtk").write_text("")
    out = tmp_path / "out.h5"
    args = command.format(tmp=tmp_path, out=out).split()
    assert _status(args) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_help_is_quick_shows_defaults_and_a_bare_fenop_shows_it(capsys):
    # building the parser imports neither torch nor scikit-fem
    probe = "import sys; from fenop.cli import build_parser; build_parser(); "
    probe += "print(sorted({'torch', 'skfem'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
    from fenop.data.pdes import PDES
    from fenop.fem.mesh import DOMAINS

    assert set(PDE_NAMES) == set(PDES) and list(DOMAIN_NAMES) == list(DOMAINS)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 32)" in out and "(default: 0)" in out and "(default: None)" not in out
    assert _status([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fenop") and "generate" in err and "predict" in err


def test_ctrl_c_while_torch_imports_is_one_clean_line():
    # `fenop info NAME` imports torch for a second or two after it starts
    process = subprocess.Popen(
        [sys.executable, "-m", "fenop.cli", "info", "darcy-fno"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_by_default,
    )
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    with process.stderr:
        stderr = process.stderr.read()
    process.wait(timeout=60)
    # 130, or ended by the SIGINT itself after fenop's line (an import interrupted
    # half-way, wandb's under neuraloperator, can leave that at exit): a shell
    # reports 130 for both
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert stderr.strip() == "fenop info: interrupted"


@pytest.mark.parametrize(
    ("damage", "message"),
    [("header", "damaged: HDF5 cannot read its structure"), ("points", "cells have zero area")],
)
def test_a_damaged_store_is_one_line_in_every_command(tmp_path, capsys, damage, message):
    data = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "2", "--resolution", "9", "-o", str(data), "-q"]) == 0
    if damage == "header":  # zeros over the root group's object header
        with open(data, "r+b") as raw:
            raw.seek(512)
            raw.write(bytes(4096))
    else:
        with h5py.File(data, "r+") as f:
            f["mesh_points"][:] = 0.0
    out = tmp_path / "p.h5"
    for command in (["info", str(data)], ["predict", "darcy-fno", str(data), "-o", str(out)]):
        assert _status([*command, "-q"] if command[0] == "predict" else command) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and str(data) in err
    assert _status(["evaluate", "darcy-fno", str(data)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, capsys):
    # /proc takes no new files, even from root: the user's path in the message, not
    # the hidden staging file's
    data = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "1", "--resolution", "5", "-o", str(data), "-q"]) == 0
    for command in (["predict", "darcy-fno", str(data), "-o"], ["convert", str(data)]):
        target = "/proc/fenop-out.h5" if command[0] == "predict" else "/proc/fenop-out.xdmf"
        assert _status([*command, target]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fenop {command[0]}: error: {target}: cannot be written"), err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    # `fenop info darcy-fno | head -1`: the pipe closes before fenop writes
    process = subprocess.Popen(
        [sys.executable, "-m", "fenop.cli", "info", "darcy-fno"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()
    with process.stderr:
        stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 141 and stderr == ""


def test_generate_says_when_it_resumes_or_has_nothing_to_do(tmp_path, capsys):
    path = tmp_path / "d.h5"
    args = ["generate", "poisson", "--resolution", "5", "--chunk-size", "2", "-o", str(path)]
    assert main([*args, "-n", "3", "-q"]) == 0
    with h5py.File(path, "r+") as f:  # as an interrupted run leaves it
        f.attrs["n_complete"] = 2
    assert main([*args, "-n", "3"]) == 0
    out, err = capsys.readouterr()
    assert f"resuming {path}: 2 of 3 samples there" in err
    assert f"wrote 1 poisson samples to {path} (3 in all)" in out
    assert main([*args, "-n", "3"]) == 0
    assert "holds all 3 poisson samples already; nothing to do" in capsys.readouterr().out


def test_convert_to_paraview_and_back(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert main(["generate", "poisson", "-n", "3", "--resolution", "5", "-o", str(data), "-q"]) == 0
    assert main(["convert", str(data), str(tmp_path / "view.xdmf"), "--samples", "0:2"]) == 0
    assert "(its arrays in view.h5)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "view.xdmf"), str(tmp_path / "back.h5")]) == 0
    with h5py.File(data) as f, h5py.File(tmp_path / "back.h5") as g:
        np.testing.assert_array_equal(g["u"][()], f["u"][:2])
    capsys.readouterr()
    assert main(["convert", str(data), str(tmp_path / "d.xdmf")]) == 2  # would write d.h5
    err = capsys.readouterr().err.strip()
    assert err == f"fenop convert: error: {data}: is an input; name the output otherwise"
    assert not (tmp_path / "d.xdmf").exists()


def test_existing_output_of_another_recipe_is_kept(tmp_path, capsys):
    path = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "2", "--resolution", "5", "-o", str(path), "-q"]) == 0
    before = path.read_bytes()
    assert (
        main(["generate", "darcy", "-n", "2", "--resolution", "5", "--seed", "1", "-o", str(path)])
        == 2
    )
    assert "different seed" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_generate_with_a_killed_worker_fails_clearly_and_resumes(tmp_path):
    path = tmp_path / "d.h5"
    args = ["generate", "darcy", "-n", "600", "--resolution", "33", "-j", "2"]
    args += ["--chunk-size", "8", "-o", str(path), "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fenop.cli", *args], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_samples(path, 16)
        _, workers = generation_workers(process.pid)
        assert workers, "no worker process found"
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        # Reaped here, so that a hang fails this test alone (an unreaped process
        # warns in whichever later test collects it).
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == 1
    assert f"fenop generate: error: {path}: a worker process died (killed by SIGKILL)" in stderr
    done = read_header(path)["n_complete"]
    assert 16 <= done < 600 and f"the {done} samples written are kept" in stderr
    assert main(args) == 0 and read_header(path)["n_complete"] == 600  # the same command resumes


def test_ctrl_c_early_in_a_parallel_generate_is_one_clean_line(tmp_path):
    path = tmp_path / "d.h5"
    args = ["generate", "darcy", "-n", "200", "--resolution", "33", "-j", "2", "-o", str(path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fenop.cli", *args, "-q"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
        preexec_fn=sigint_by_default,
    )
    try:
        # The forkserver, once there, imports torch and scikit-fem for seconds: the
        # moment at which a Ctrl-C used to print its traceback.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            "forkserver" in command_line(child) for child in child_processes(process.pid)
        ):
            time.sleep(0.01)
        time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()  # also where the test failed before reading it
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines() == [stderr.strip().splitlines()[-1]]  # one line
    assert "interrupted" in stderr


def test_console_script_is_installed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fenop", "info", str(tmp_path / "none.h5")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no such file" in result.stderr


@pytest.fixture
def trained(tmp_path):
    """A tiny model trained by `fenop train` on Darcy data; returns the folder."""
    assert (
        main(
            [
                "generate",
                "darcy",
                "-n",
                "16",
                "--resolution",
                "9",
                "-o",
                str(tmp_path / "d.h5"),
                "-q",
            ]
        )
        == 0
    )
    (tmp_path / "c.toml").write_text(CONFIG)
    assert main(["train", str(tmp_path / "c.toml"), "-q"]) == 0
    return tmp_path


def test_train_evaluate_predict(trained, capsys):
    run = trained / "run"
    assert (run / "best" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    picture = trained / "eval.png"
    assert main(["evaluate", str(run / "best"), str(trained / "d.h5"), "--plot", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "relative L2: mean" in out and "over 16 samples" in out
    assert picture.read_bytes()[:4] == b"\x89PNG"
    output = trained / "pred.h5"
    assert main(["predict", str(run / "best"), str(trained / "d.h5"), "-o", str(output), "-q"]) == 0
    # written privately and renamed, yet an ordinary file like the input
    assert output.stat().st_mode & 0o777 == (trained / "d.h5").stat().st_mode & 0o777
    with h5py.File(output) as f, h5py.File(trained / "d.h5") as g:
        assert f["u"].shape == g["u"].shape
        assert f.attrs["model"] == str(run / "best") and "fenop_version" in f.attrs
        relative = np.linalg.norm(f["u"][()] - g["u"][()]) / np.linalg.norm(g["u"][()])
        assert relative < 1.0
    assert main(["info", str(run / "best")]) == 0
    out = capsys.readouterr().out
    assert "fenop checkpoint" in out and "saved       best: the epoch of lowest test error" in out
    assert main(["info", str(run / "last")]) == 0
    assert "saved       last: the latest epoch" in capsys.readouterr().out


def test_threads_sets_pytorchs_threads(trained, capsys):
    threads = torch.get_num_threads()
    output = trained / "threads.h5"
    try:
        args = ["predict", str(trained / "run" / "best"), str(trained / "d.h5"), "-o", str(output)]
        assert main([*args, "-q", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert _status([*args, "--overwrite", "--threads", "0"]) == 2
    assert "argument --threads: expected a positive integer" in capsys.readouterr().err


def test_train_resume(trained, capsys):
    """Exact resumption is tested on the Trainer; here, the command's side of it."""
    config = trained / "c.toml"
    before = (trained / "run" / "last" / "model.safetensors").read_bytes()
    assert main(["train", str(config), "-q", "--resume"]) == 0  # finished: nothing left to do
    assert (trained / "run" / "last" / "model.safetensors").read_bytes() == before
    assert "finished at epoch 2 already; nothing to resume" in capsys.readouterr().err
    assert main(["train", str(config), "-q", "--resume", str(trained / "missing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    config.write_text(CONFIG.replace("epochs = 2", "epochs = 3"))
    assert main(["train", str(config), "-q", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_ctrl_c_during_training_says_how_to_resume(trained):
    config = trained / "long.toml"
    # Enough epochs that the run is still going when it is interrupted.
    config.write_text(CONFIG.replace("epochs = 2", "epochs = 2000").replace('"run"', '"long"'))
    process = subprocess.Popen(
        [sys.executable, "-m", "fenop.cli", "train", str(config), "-q"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_by_default,
    )
    try:
        deadline = time.monotonic() + 120
        while not (trained / "long" / "last").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()  # also where the test failed before reading it
    assert process.returncode == 130
    last = trained / "long" / "last"
    epoch = json.loads((last / "training.json").read_text())["epoch"]
    assert stderr.strip().splitlines() == [
        f"fenop train: interrupted: {last} holds epoch {epoch}; "
        f"`fenop train {config} --resume` continues from there"
    ]


def test_predict_on_another_mesh_and_bad_input(trained, capsys):
    best = str(trained / "run" / "best")
    finer = trained / "finer.h5"
    assert main(["generate", "darcy", "-n", "3", "--resolution", "17", "-o", str(finer), "-q"]) == 0
    assert main(["predict", best, str(finer), "-o", str(trained / "p.h5"), "-q"]) == 0
    lshape = trained / "lshape.h5"
    command = f"generate darcy -n 2 --domain lshape --resolution 9 -o {lshape} -q"
    assert main(command.split()) == 0
    capsys.readouterr()
    cases = [
        (["predict", best, str(lshape), "-o", str(trained / "x.h5")], "not in the model's domain"),
        (["predict", best, str(trained / "none.h5"), "-o", str(trained / "x.h5")], "no such file"),
        (
            ["predict", str(trained / "nomodel"), str(finer), "-o", str(trained / "x.h5")],
            "nor a shipped model",
        ),
        (["predict", best, str(finer), "-o", str(trained / "p.h5")], "exists; pass --overwrite"),
    ]
    no_a = trained / "no_a.h5"
    assert main(["generate", "poisson", "-n", "2", "--resolution", "9", "-o", str(no_a), "-q"]) == 0
    nan = trained / "nan.h5"
    nan.write_bytes(finer.read_bytes())
    with h5py.File(nan, "r+") as f:
        f["a"][1, 5] = np.nan
    truncated = trained / "truncated.h5"
    truncated.write_bytes(finer.read_bytes()[:2000])
    cases += [
        (["evaluate", best, str(no_a)], "missing field 'a'"),
        (["predict", best, str(no_a), "-o", str(trained / "x.h5")], "missing field 'a'"),
        (["predict", best, str(nan), "-o", str(trained / "x.h5")], "NaN or Inf in sample 1"),
        (["predict", best, str(truncated), "-o", str(trained / "x.h5")], "truncated or corrupt"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (trained / "x.h5").exists()
    # no staging files left behind (the generations' lock files stay, by design)
    hidden = [p.name for p in trained.iterdir() if p.name.startswith(".")]
    assert [name for name in hidden if not name.endswith(".h5.lock")] == []


# 3 -> 5 vertices a side; the data's 9 x 9 mesh is interpolated to it
FEMULTIGRID = CONFIG.replace(
    'processor = "mgno"\nresolution = 8',
    'processor = "femultigrid"\n[model.hierarchy]\ndomain = "square"\nresolution = 3\nlevels = 2',
)


def test_femultigrid_from_a_configuration(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "16", "--resolution", "9", "-o", str(data), "-q"]) == 0
    # With the optional gradient clipping, which the checkpoint records.
    (tmp_path / "c.toml").write_text(FEMULTIGRID.replace("epochs = 2", "epochs = 2\ngrad_clip = 1"))
    assert main(["train", str(tmp_path / "c.toml"), "-q"]) == 0
    best = tmp_path / "run" / "best"
    assert read_config(best)["training"]["grad_clip"] == 1.0
    model = load_model(best)
    assert model.space_in.n_dofs == 81 and model.processor.space.n_dofs == 25
    finer = tmp_path / "finer.h5"
    assert main(["generate", "darcy", "-n", "2", "--resolution", "17", "-o", str(finer), "-q"]) == 0
    assert main(["predict", str(best), str(finer), "-o", str(tmp_path / "p.h5"), "-q"]) == 0
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["u"].shape == (2, 289) and np.isfinite(f["u"][()]).all()
    capsys.readouterr()
    assert main(["info", str(best)]) == 0
    out = capsys.readouterr().out
    assert "hierarchy   2 levels from P1 on MeshTri1, 9 vertices" in out
    assert "resolution" not in out and len(out) < 2000  # the coarse mesh is not printed
    (tmp_path / "c.toml").write_text(FEMULTIGRID.replace('"square"', '"lshape"'))
    assert main(["train", str(tmp_path / "c.toml"), "-q", "--overwrite"]) == 2
    assert "not in the domain of [model.hierarchy]" in capsys.readouterr().err


def test_femultigrid_with_coarser_levels_from_a_configuration(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "16", "--resolution", "9", "-o", str(data), "-q"]) == 0
    # 3 -> 4 vertices a side is not a refinement; 4 -> 7 is
    config = FEMULTIGRID.replace("resolution = 3", "resolution = 4\ncoarser = [3]")
    (tmp_path / "c.toml").write_text(config)
    assert main(["train", str(tmp_path / "c.toml"), "-q"]) == 0
    model = load_model(tmp_path / "run" / "best")
    assert [s.n_dofs for s in model.processor.spaces] == [9, 16, 49]
    assert not model.processor.nested
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run" / "best")]) == 0
    assert "3 levels, not nested, of P1 on MeshTri1: 9, 16, 49 vertices" in capsys.readouterr().out
    (tmp_path / "c.toml").write_text(config.replace('"square"', '"lshape"'))
    assert main(["train", str(tmp_path / "c.toml"), "-q", "--overwrite"]) == 2
    assert "must be odd" in capsys.readouterr().err


def test_info_on_femultigrid_with_a_hierarchy_that_is_not_nested(tmp_path, capsys):
    spaces = [FunctionSpace(unit_square(n), dirichlet="boundary") for n in (3, 6, 11)]
    model = FEOperator(spaces[-1], spaces[-1], FEMultigrid(spaces, 1, 1, width=4, n_layers=1))
    assert main(["info", str(save_checkpoint(tmp_path / "ckpt", model))]) == 0
    out = capsys.readouterr().out
    assert "hierarchy   3 levels, not nested, of P1 on MeshTri1: 9, 36, 121 vertices" in out
    assert len(out) < 2000  # the meshes are not printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_predict_with_the_shipped_model_on_cuda_matches_the_cpu(tmp_path):
    data = tmp_path / "in.h5"
    assert main(["generate", "darcy", "-n", "8", "--resolution", "33", "-o", str(data), "-q"]) == 0
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.h5"
        command = ["predict", "darcy-fno", str(data), "-o", str(outputs[device])]
        assert main([*command, "--device", device, "-q"]) == 0
    with h5py.File(outputs["cpu"]) as f, h5py.File(outputs["cuda"]) as g:
        relative = np.linalg.norm(f["u"][()] - g["u"][()]) / np.linalg.norm(f["u"][()])
    assert relative < 1e-4  # float32 on both; FFT and reduction order differ


def test_a_fault_of_fenop_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    # Only fenop's own input errors (and the file system's) become "error: ..." with
    # status 2; a TypeError from inside fenop is a bug and keeps its traceback.
    import fenop.train

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(fenop.train, "predict_store", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["predict", "darcy-fno", str(tmp_path / "in.h5"), "-o", str(tmp_path / "o.h5")])


def test_train_over_a_finished_run_is_refused_unless_resumed_or_overwritten(trained, capsys):
    config = trained / "c.toml"
    run = trained / "run"
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(config), "-q"]) == 2
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before  # nothing replaced
    copy = trained / "copy.toml"
    copy.write_text(config.read_text().replace('output = "run"', 'output = "run2"'))
    assert main(["train", str(copy), "-q"]) == 0
    assert main(["train", str(copy), "-q", "--overwrite"]) == 0
    lines = (trained / "run2" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == sorted(set(epochs))  # one run's lines, not two


def test_evaluate_scores_a_range_or_the_checkpoints_test_split(trained, capsys):
    best = str(trained / "run" / "best")
    data = str(trained / "d.h5")
    assert main(["evaluate", best, data, "--samples", "2:5", "--per-sample"]) == 0
    out = capsys.readouterr().out
    assert "over 3 samples" in out and [line.split()[0] for line in out.splitlines()[2:]] == [
        "2",
        "3",
        "4",
    ]
    assert main(["evaluate", best, data, "--split", "test"]) == 0
    n_test = read_config(trained / "run" / "best")["data"]["n_test"]
    assert f"over {n_test} samples" in capsys.readouterr().out
    assert _status(["evaluate", best, data, "--samples", "five"]) == 2
    assert "expected START:STOP" in capsys.readouterr().err
    # the shipped model's test split (1000:1200) is not in this small store
    assert main(["evaluate", "darcy-fno", data, "--split", "test"]) == 2
    assert "no samples in 1000:1200 of its 16" in capsys.readouterr().err


def test_evaluate_plots_a_shipped_model_without_the_current_folders_metrics(
    trained, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    Path("metrics.jsonl").write_text("not the shipped model's run\n")  # once read, a crash
    data = str(trained / "d.h5")
    assert main(["evaluate", "darcy-fno", data, "--samples", "3:5", "--plot", "p.png"]) == 0
    assert Path("p.png").read_bytes()[:4] == b"\x89PNG"


def test_info_refuses_a_checkpoint_whose_weights_are_truncated(tmp_path, capsys):
    import shutil

    from fenop.train import PRETRAINED

    folder = tmp_path / "ckpt"
    shutil.copytree(PRETRAINED / "darcy-fno", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors is not readable" in err and len(err.splitlines()) == 1


def test_info_without_a_file_lists_the_shipped_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "darcy-fno                  darcy, fno; test relative L2 0.01" in out
    assert "nonlinear-diffusion-hard   nonlinear_diffusion, fno, global galerkin constraint" in out
