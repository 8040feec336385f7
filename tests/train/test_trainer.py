import json
import math

import pytest
import torch

import fenop.train.trainer as trainer_module
from fenop.data import FieldDataset, generate
from fenop.fem import unit_square
from fenop.operators import FEOperator, MgNO
from fenop.train import Trainer, load_model, read_config, resolve_device


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = generate(
        "darcy",
        16,
        unit_square(9),
        seed=0,
        path=tmp_path_factory.mktemp("d") / "d.h5",
        progress=False,
    )
    return FieldDataset(path, indices=range(12)), FieldDataset(path, indices=range(12, 16))


def _model(train):
    torch.manual_seed(0)
    a, u = train.normalizer(["a"]), train.normalizer(["u"])
    return FEOperator(
        train.space,
        train.space,
        MgNO(4, 1, grid=(8, 8), width=4, n_layers=1),
        resolution=8,
        input_stats=a,
        output_stats=u,
    )


def _trainer(data, directory, **kwargs):
    train, test = data
    options = dict(
        epochs=4, batch_size=5, lr=3e-3, directory=directory, progress=False, device="cpu"
    )
    return Trainer(_model(train), train, test, **{**options, **kwargs})


def test_training_writes_metrics_and_checkpoints(data, tmp_path):
    history = _trainer(data, tmp_path / "run").fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert history[-1]["test_l2"] < history[0]["test_l2"]  # it learns
    best = read_config(tmp_path / "run" / "best")
    assert best["test_error"] == min(h["test_l2"] for h in history)
    assert read_config(tmp_path / "run" / "last")["epoch"] == 4
    model = load_model(tmp_path / "run" / "last")
    x, _ = data[1][0]
    assert model(x[None]).shape == (1, 1, data[0].space.n_dofs)


def test_resumed_run_ends_with_the_same_weights(data, tmp_path, monkeypatch):
    reference = _trainer(data, tmp_path / "reference")
    reference.fit()

    interrupted = _trainer(data, tmp_path / "resumed")
    real_write = Trainer._write

    def write_then_stop(self, metrics):
        real_write(self, metrics)
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt  # killed after the second epoch's checkpoint

    monkeypatch.setattr(Trainer, "_write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "_write", real_write)

    resumed = _trainer(data, tmp_path / "resumed", resume=True)
    assert resumed.epoch == 2
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [3, 4]
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        _trainer(data, tmp_path / "resumed", resume=True, lr=1e-2)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(
    data, tmp_path, monkeypatch
):
    trainer = _trainer(data, tmp_path / "run")
    real_loss = trainer.loss_fn.forward
    calls = []

    def poisoned(pred, target):
        calls.append(1)
        loss = real_loss(pred, target)
        return loss * float("nan") if len(calls) == 5 else loss  # epoch 2, step 2

    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)
    with pytest.raises(
        FloatingPointError,
        match=r"loss is nan at step 2 of epoch 2; the last good checkpoint is .*last \(epoch 1\)",
    ):
        trainer.fit()
    assert read_config(tmp_path / "run" / "last")["epoch"] == 1


def test_a_diverging_run_stops_at_its_first_nan_and_saves_no_nan(data, tmp_path):
    # lr = 1e3: the weights become NaN within the first epochs. Before NaN was
    # NaN in every norm, such a run trained on with a loss of 0.0 and saved its
    # NaN weights as the best checkpoint, test error 0.0.
    trainer = _trainer(data, tmp_path / "run", lr=1e3, epochs=6)
    with pytest.raises(FloatingPointError, match=r"training diverged: .* epoch \d") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    for line in lines:
        metrics = json.loads(line)
        assert all(math.isfinite(metrics[k]) for k in ("train_loss", "test_l2", "test_h1"))
    for saved in ("best", "last"):
        if (tmp_path / "run" / saved).is_dir():  # finite weights, or not saved at all
            load_model(tmp_path / "run" / saved)


def test_weights_that_become_nan_at_an_epochs_last_step_stop_the_run(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run")
    steps = []

    def poison(optimiser, args, kwargs):
        steps.append(1)
        if len(steps) == 6:  # the last step of epoch 2 (3 a epoch): no later loss sees it
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(math.nan)

    trainer.optimiser.register_step_post_hook(poison)
    with pytest.raises(
        FloatingPointError, match=r"the weights .* are not finite after epoch 2; the last good"
    ):
        trainer.fit()
    assert read_config(tmp_path / "run" / "last")["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("killed", ["after last/", "between last/ and best/"])
def test_a_run_killed_between_its_saves_resumes_whole(data, tmp_path, monkeypatch, killed):
    # An epoch saves last/, then best/ (if it improved), then its metrics line; a
    # kill between any two must not lose the line or the best checkpoint.
    reference = _trainer(data, tmp_path / "reference")
    expected = reference.fit()
    real_append, real_save = Trainer._append_metrics, trainer_module.save_checkpoint

    def append_or_kill(self, metrics):
        if metrics["epoch"] == 2 and killed == "after last/":
            raise KeyboardInterrupt
        real_append(self, metrics)

    def save_or_kill(folder, *args, **kwargs):
        if folder.name == "best" and kwargs["extra"]["epoch"] == 2 and "best/" in killed:
            raise KeyboardInterrupt
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_append_metrics", append_or_kill)
    monkeypatch.setattr(trainer_module, "save_checkpoint", save_or_kill)
    with pytest.raises(KeyboardInterrupt):
        _trainer(data, tmp_path / "run").fit()
    monkeypatch.undo()
    assert expected[1]["test_l2"] < expected[0]["test_l2"]  # epoch 2 improved: saves best/
    if "best/" in killed:
        assert read_config(tmp_path / "run" / "best")["epoch"] == 1  # epoch 2's not saved
    _trainer(data, tmp_path / "run", resume=True).fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    written = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in written] == [1, 2, 3, 4]
    for got, want in zip(written, expected, strict=True):
        assert got["test_l2"] == want["test_l2"] and got["train_loss"] == want["train_loss"]
    best, reference_best = (
        read_config(p / "best") for p in (tmp_path / "run", tmp_path / "reference")
    )
    assert (
        best["epoch"] == reference_best["epoch"]
        and best["test_error"] == reference_best["test_error"]
    )
    x, _ = data[1][0]
    torch.testing.assert_close(
        load_model(tmp_path / "run" / "best")(x[None]),
        load_model(tmp_path / "reference" / "best")(x[None]),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("clip", [None, 0.01])
def test_gradients_are_clipped_to_the_given_norm(data, clip):
    trainer = _trainer(data, None, epochs=1, grad_clip=clip)
    norms = []

    def record(optimiser, args, kwargs):
        grads = [p.grad for group in optimiser.param_groups for p in group["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    trainer.optimiser.register_step_pre_hook(record)
    trainer.fit()
    assert len(norms) == 3  # 12 samples in batches of 5
    if clip is None:
        assert min(norms) > 0.01  # so that the clipped run below has something to clip
    else:
        assert max(norms) <= clip * (1 + 1e-5)


def test_bad_settings(data):
    with pytest.raises(ValueError, match="schedule"):
        _trainer(data, None, schedule="linear")
    with pytest.raises(ValueError, match="loss"):
        _trainer(data, None, loss="l1")
    with pytest.raises(ValueError, match="grad_clip"):
        _trainer(data, None, grad_clip=0.0)
    for options in ({"lr": math.inf}, {"lr": math.nan}, {"weight_decay": math.inf}):
        with pytest.raises(ValueError, match=rf"`{next(iter(options))}` must be .* and finite"):
            _trainer(data, None, **options)
    with pytest.raises(ValueError, match=r"`epochs` must be int, got 2\.5"):
        _trainer(data, None, epochs=2.5)
    with pytest.raises(ValueError, match="grad_clip"):
        _trainer(data, None, grad_clip=math.inf)
    with pytest.raises(ValueError, match="unknown device 'tpu'; expected cpu, cuda or cuda:N"):
        _trainer(data, None, device="tpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device() == resolve_device("auto") == torch.device(auto)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("cuda:x")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="no CUDA device here" if count == 0 else "only"):
        resolve_device(f"cuda:{count}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_with_and_without_mixed_precision(data, tmp_path, amp):
    trainer = _trainer(data, tmp_path / "run", device="cuda", amp=amp, epochs=6)
    assert trainer.amp == amp
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert history[-1]["test_l2"] < history[0]["test_l2"]  # it learns
    # The checkpoint of a CUDA run loads on the CPU and computes the same function.
    model = load_model(tmp_path / "run" / "last")
    x, _ = data[1][0]
    on_gpu = trainer.model(x[None].cuda()).cpu()
    torch.testing.assert_close(model(x[None]), on_gpu, rtol=2e-2, atol=1e-6)
