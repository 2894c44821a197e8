"""DDP and FSDP2 with GOPDHead: 2 gloo ranks on CPU give the gradients of one process on the global batch.

The global batch is split unevenly (rank 0: 1 sequence, rank 1: 3, with different numbers of masked
tokens), so a per-rank token-mean, or a mean left to DDP's gradient averaging, would give a different
gradient; GOPDHead's global token count (gopd_kernels.distributed) makes them equal.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gopd_kernels as gk

B, T, D, V = 4, 5, 8, 24
SPLIT = (slice(0, 1), slice(1, 4))  # rank 0's and rank 1's sequences
OPTIONS = dict(lam=1.25, mode="full")


class Net(torch.nn.Module):
    """A body (stand-in for a transformer) and the student's LM head, with the loss in the head's forward."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = torch.nn.Linear(D, D)
        lm_head, teacher_head, ref_head = (torch.nn.Linear(D, V) for _ in range(3))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        for m in (lm_head, teacher_head, ref_head):
            for p in m.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.5
        teacher_head.requires_grad_(False)
        ref_head.requires_grad_(False)
        self.head = gk.GOPDHead(lm_head, teacher_head=teacher_head, ref_head=ref_head, **OPTIONS)

    def forward(self, x, targets, teacher_hidden, ref_hidden):
        return self.head(torch.tanh(self.body(x)), targets, teacher_hidden, ref_hidden).loss


def global_batch():
    g = torch.Generator().manual_seed(1)
    x, ht, hr = (torch.randn(B, T, D, generator=g) for _ in range(3))
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3:] = -100  # rank 0: 3 valid tokens; rank 1: 15 - 1 = 14
    y[2, 0] = -100
    return x, y, ht, hr


def trainable_grads(net, full=lambda g: g):
    return {n: full(p.grad).detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def _ddp(rank, x, y, ht, hr):
    net = Net()
    model = torch.nn.parallel.DistributedDataParallel(net)  # kept alive: its reducer syncs the gradients
    loss = model(x, y, ht, hr)
    loss.backward()
    return dict(loss=loss, grads=trainable_grads(net))


def _fsdp2(rank, x, y, ht, hr):
    from torch.distributed.fsdp import fully_shard
    net = Net()
    fully_shard(net.head)  # the head is its own FSDP unit: gathered for its forward, which computes the loss
    fully_shard(net)
    result = dict(error=None)
    try:  # a sharded weight passed directly is refused with the fix named, never a wrong gradient
        gk.fused_linear_gopd_loss(ht, net.head.lm_head.weight, y, ht, net.head.teacher_head.weight, hr,
                                  net.head.ref_head.weight, **OPTIONS)
    except TypeError as err:
        result["error"] = str(err)
    loss = net(x, y, ht, hr)
    loss.backward()
    return dict(result, loss=loss, grads=trainable_grads(net, full=lambda g: g.full_tensor()))


def _worker(rank, world, init_file, out_dir):
    """Both recipes in one process group (one spawn: its start-up is most of this test's time)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batch = [t[SPLIT[rank]] for t in global_batch()]
        results = {}
        for kind, recipe in (("ddp", _ddp), ("fsdp2", _fsdp2)):
            result = recipe(rank, *batch)
            loss_sum = result["loss"].detach().clone()
            dist.all_reduce(loss_sum)
            result["loss"] = loss_sum / world  # the average of the ranks' losses is the global token-mean
            results[kind] = result
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def one_process():
    net = Net()
    loss = net(*global_batch())
    loss.backward()
    return loss.detach(), trainable_grads(net)


def test_ddp_and_fsdp2_match_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    want_loss, want = one_process()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for kind, res in torch.load(tmp_path / f"{rank}.pt").items():
            assert set(res["grads"]) == set(want)
            for name, g in want.items():
                torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind}: {name}: {m}")
            torch.testing.assert_close(res["loss"], want_loss, rtol=1e-5, atol=1e-6)
            if kind == "fsdp2":
                assert "DTensor" in res["error"] and "GOPDHead" in res["error"]


def test_global_num_items_without_a_process_group():
    y = torch.tensor([[1, -100, 2], [3, 4, -100]])
    assert float(gk.global_num_items(y)) == 4
    assert float(gk.global_num_items([y, y[:1]])) == 6
    with pytest.raises(TypeError, match="targets: expected a tensor"):
        gk.global_num_items([])
