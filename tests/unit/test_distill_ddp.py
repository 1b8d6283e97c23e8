"""DistributedDataParallel: two CPU processes with gloo give the result of one process."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from edgekd.data import ArrayDataset
from edgekd.distill import parallel
from edgekd.distill.trainer import train

STEPS_EPOCHS, BATCH = 3, 16


def _setup(unlabeled: bool):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 6, 6, generator=g)
    y = (torch.arange(64) % 4).numpy()
    if unlabeled:
        y[::5] = -1  # some unlabeled samples: the teacher's soft targets stand in for them
    ds = ArrayDataset(x.numpy(), y)
    val = ArrayDataset(torch.randn(32, 3, 6, 6, generator=g).numpy(), (torch.arange(32) % 4).numpy())
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(108, 4))
    with torch.no_grad():
        teacher[1].weight.mul_(8)
    student = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.ReLU(), nn.Linear(16, 4))
    return ds, val, teacher, student


def _fit(student, ds, val, teacher):
    return train(student, ds, val, epochs=STEPS_EPOCHS, lr=5e-3, seed=0, batch_size=BATCH, teacher=teacher,
                 alpha=0.7, temperature=2.0, augment=True)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        saved = {}
        for unlabeled in (False, True):
            ds, val, teacher, student = _setup(unlabeled)
            res = _fit(student, ds, val, teacher)
            saved[f"unlabeled={unlabeled}"] = {
                "state": student.state_dict(), "steps": torch.tensor(res.steps),
                "world": torch.tensor(res.world_size), "loss": torch.tensor(res.curve[-1]["loss"])}
        if rank == 0:
            torch.save(saved, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    # All labeled: each rank's half-batch mean, averaged by DDP, is the global batch mean (to rounding).
    # With unlabeled samples CE averages over each rank's labeled ones, so the weighting moves a little.
    for unlabeled, tol in ((False, 1e-5), (True, 1e-2)):
        ds, val, teacher, student = _setup(unlabeled)
        single = _fit(student, ds, val, teacher)
        got = saved[f"unlabeled={unlabeled}"]
        assert int(got["world"]) == 2 and int(got["steps"]) == single.steps == STEPS_EPOCHS * 4
        for k, v in student.state_dict().items():
            assert torch.allclose(got["state"][k], v, atol=tol, rtol=tol), (unlabeled, k)
        assert abs(float(got["loss"]) - single.curve[-1]["loss"]) < tol * 10


def test_without_a_process_group_it_is_one_rank():
    assert parallel.rank_and_world() == (0, 1)
    assert parallel.init_from_env() == (0, 1)  # no torchrun environment: nothing to join
    assert parallel.mean_over_ranks(6.0, 3) == 2.0


def test_mixed_precision_only_on_gpu():
    from edgekd.distill.trainer import autocast_dtype, resolve_device

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) is None
    assert autocast_dtype("bf16", gpu) is torch.bfloat16 and autocast_dtype("fp16", gpu) is torch.float16
    assert autocast_dtype("fp32", gpu) is None
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _fit_two(bn: bool, precision: str = "fp32"):
    """The strategies' shared loop on two modules (a student and a peer, as mutual learning has), with
    a per-sample target looked up by index, as the teacher-logit table is."""
    from edgekd.distill.strategies.common import fit

    ds, val, _, student = _setup(False)
    torch.manual_seed(1)
    peer = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.ReLU(),
                         nn.Linear(16, 4))
    soft = torch.softmax(torch.randn(len(ds), 4, generator=torch.Generator().manual_seed(2)), 1)

    def loss_fn(step, xb, yb, idx, draw):
        a, b = student(xb), peer(xb)
        kl = nn.functional.kl_div(torch.log_softmax(a, 1), soft[idx], reduction="batchmean")
        mutual = nn.functional.kl_div(torch.log_softmax(b, 1), torch.softmax(a.detach(), 1), reduction="batchmean")
        return nn.functional.cross_entropy(a, yb) + kl + nn.functional.cross_entropy(b, yb) + mutual

    views = [ds.x, ds.x + 0.1]
    res = fit([student, peer], loss_fn, ds, val, watch={"student": student, "peer": peer}, views=views,
              steps=STEPS_EPOCHS * 4, lr=5e-3, seed=0, batch_size=BATCH, precision=precision)
    return student, peer, res


def _fit_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        saved = {}
        for bn in (False, True):
            student, peer, res = _fit_two(bn)
            saved[f"bn={bn}"] = {"student": student.state_dict(), "peer": peer.state_dict(),
                                 "steps": torch.tensor(res.steps), "loss": torch.tensor(res.curve[-1]["loss"])}
        torch.save(saved, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_strategy_loop_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "fit.pt"
    mp.spawn(_fit_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    # every rank ends with the same weights and buffers, BatchNorm included (rank 0's statistics)
    for bn in (False, True):
        for name in ("student", "peer"):
            a, b = ranks[0][f"bn={bn}"][name], ranks[1][f"bn={bn}"][name]
            assert all(torch.equal(a[k], b[k]) for k in a), (bn, name)
    # without BatchNorm, two half batches with averaged gradients are one process's global batch
    student, peer, single = _fit_two(False)
    got = ranks[0]["bn=False"]
    assert int(got["steps"]) == single.steps == STEPS_EPOCHS * 4
    for name, model in (("student", student), ("peer", peer)):
        for k, v in model.state_dict().items():
            assert torch.allclose(got[name][k], v, atol=1e-5, rtol=1e-5), (name, k)
    assert abs(float(got["loss"]) - single.curve[-1]["loss"]) < 1e-4


def test_strategy_loop_asks_for_autocast_only_on_gpu():
    student, _, res = _fit_two(False, precision="bf16")
    assert res.precision == "fp32"  # no autocast on the CPU: the same weights as an fp32 run
    again, _, _ = _fit_two(False, precision="fp32")
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values(), strict=True))
