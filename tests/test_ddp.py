"""A prepared graph trains under DistributedDataParallel: 2 CPU ranks, gloo, different data per rank."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nmgraph
from nmgraph.passes.insert_masks import STATE_NAME
from nmgraph.training import SparsityCallback, prepare

WORLD = 2
STEPS = 5


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _prepared(batch=8):
    torch.manual_seed(0)
    model = MLP()
    gm = prepare(model, (torch.randn(batch, 16),), "2:4", method="sr-ste", permute=False,
                 total_steps=STEPS, warmup=0.2)
    return model, gm


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _, gm = _prepared()
        ddp = torch.nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        cb = SparsityCallback(ddp)  # finds the prepared graph inside the wrapper
        for step in range(STEPS):
            x, r = _batch(rank, step)
            (ddp(x) * r).sum().backward()
            opt.step()
            opt.zero_grad()
            cb.step()
        state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, state)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_keep_identical_masks_and_weights(tmp_path):
    out = tmp_path / "states.pt"
    try:
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as e:
        if "gloo" in str(e).lower() and "connect" in str(e).lower():
            pytest.skip(f"gloo cannot open a local TCP store here: {e}")
        raise
    s0, s1 = torch.load(out, weights_only=True)
    assert set(s0) == set(s1)
    masks = [k for k in s0 if k.startswith(STATE_NAME) and k.endswith(".mask")]
    assert len(masks) == 2  # a.weight and b.weight (head kept dense)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert int(s0[f"{STATE_NAME}.step"]) == STEPS

    # reference: one process, one forward over both ranks' batches, the gradient DDP averages. (One
    # forward: SR-STE's penalty is added once per backward of the mask op, as on each DDP rank.)
    model, gm = _prepared(batch=8 * WORLD)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    cb = SparsityCallback(gm)
    for step in range(STEPS):
        x, r = (torch.cat(t) for t in zip(*(_batch(rank, step) for rank in range(WORLD))))
        loss = (gm(x) * r).sum() / WORLD
        loss.backward()
        opt.step()
        opt.zero_grad()
        cb.step()
    ref = gm.state_dict()
    for child, st in getattr(gm, STATE_NAME).layers():
        k = f"{STATE_NAME}.{child}.mask"
        weight = s0[st.weight_name]
        assert torch.equal(s0[k], ref[k]), k
        assert torch.equal(s0[k], nmgraph.nm_mask(weight, "2:4"))
        assert not torch.equal(weight, init[st.weight_name])
    for k in init:
        torch.testing.assert_close(s0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
