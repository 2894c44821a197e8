"""Every bad input gets an error that names the argument and what was expected."""

import math

import pytest
import torch

import gopd_kernels as gk

N, V = 4, 10


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    zs, zt, zr = (torch.randn(N, V, generator=g, dtype=dtype) for _ in range(3))
    return zs, torch.randint(0, V, (N,), generator=g), zt, zr


def call(**overrides):
    zs, y, zt, zr = inputs()
    kw = dict(student_logits=zs, targets=y, teacher_logits=zt, ref_logits=zr, backend="torch")
    kw.update(overrides)
    return gk.gopd_loss(**kw)


@pytest.mark.parametrize("overrides,error,message", [
    (dict(student_logits=[[1.0]]), TypeError, "student_logits: expected a torch.Tensor"),
    (dict(student_logits=torch.zeros(N, V, dtype=torch.int64)), TypeError, "student_logits: expected a floating"),
    (dict(targets=torch.zeros(N)), TypeError, "targets: expected an integer dtype"),
    (dict(targets=torch.zeros(N + 1, dtype=torch.int64)), ValueError, "targets: expected shape (4,)"),
    (dict(teacher_logits=torch.zeros(N + 1, V)), ValueError, "teacher_logits: expected leading shape"),
    (dict(teacher_logits=torch.zeros(N, V - 1)), ValueError, "teacher_logits: vocabulary size 9 is smaller"),
    (dict(targets=torch.tensor([0, 1, V, 2])), ValueError, "targets: token id 10 is out of range [0, 10)"),
    (dict(targets=torch.tensor([0, -1, 2, 3])), ValueError, "targets: token id -1 is out of range"),
    (dict(ref_logits=None, lam=1.25), ValueError, "lam=1.25 needs a reference model"),
    (dict(teacher_logits=None), ValueError, "a teacher is required"),
    (dict(teacher_logprobs=torch.zeros(N)), ValueError, "not both"),
    (dict(teacher_logits=None, teacher_logprobs=torch.zeros(N), mode="full"), ValueError, "mode='full' needs"),
    (dict(teacher_logprobs=torch.zeros(N + 1), teacher_logits=None), ValueError, "teacher_logprobs: expected shape"),
    (dict(old_logprobs=torch.zeros(N), mode="full"), ValueError, "old_logprobs: PPO ratio clipping"),
    (dict(temperature=0.0), ValueError, "temperature: the student temperature must be"),
    (dict(temperature=(1.0, -1.0, 1.0)), ValueError, "temperature: the teacher temperature must be"),
    (dict(temperature=(1.0, 1.0)), ValueError, "temperature: expected a float or a (student, teacher"),
    (dict(mode="sparse"), ValueError, "mode: expected one of ('sampled', 'full', 'topk'), got 'sparse'"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(lam=math.nan), ValueError, "lam: expected a finite number"),
    (dict(clip_eps=1.5), ValueError, "clip_eps: expected a number in [0, 1)"),
    (dict(dual_clip=0.5), ValueError, "dual_clip: expected None or a number > 1"),
    (dict(is_cap=0), ValueError, "is_cap: expected a number > 0"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch: expected a positive token count"),
    (dict(num_items_in_batch=8, reduction="sum"), ValueError, "num_items_in_batch is only used with"),
    (dict(backend="tpu"), ValueError, "backend: unknown backend 'tpu'"),
    (dict(reduction="seq-mean-token-mean"), ValueError,
     "targets: reduction='seq-mean-token-mean' needs targets of shape [..., T] with at least 2 dims"),
    (dict(num_sequences_in_batch=3), ValueError, "num_sequences_in_batch is only used with reduction in"),
    (dict(num_items_in_batch=3, reduction="seq-mean-token-sum"), ValueError,
     "a sequence reduction takes num_sequences_in_batch"),
    (dict(num_sequences_in_batch=0, reduction="seq-mean-token-sum"), ValueError,
     "num_sequences_in_batch: expected a positive sequence count"),
    (dict(advantage_from="new"), ValueError, "advantage_from: expected one of ('current', 'old'), got 'new'"),
    (dict(advantage_from="old"), ValueError, "advantage_from='old' takes the advantage from old_logprobs"),
    (dict(advantage_from="old", mode="full", old_logprobs=torch.zeros(N)), ValueError,
     "advantage_from='old' applies to mode='sampled'"),
    (dict(backend="triton_onchip"), ValueError, "is a fused-linear kernel"),
    (dict(student_logits=torch.zeros(N, 0), teacher_logits=torch.zeros(N, 0), ref_logits=torch.zeros(N, 0)),
     ValueError, "student_logits: the vocabulary dimension is empty"),
])
def test_gopd_loss_errors(overrides, error, message):
    with pytest.raises(error) as info:
        call(**overrides)
    assert message in str(info.value)


def test_device_mismatch_is_named():
    zs, y, zt, zr = inputs()
    meta = torch.zeros(N, V, device="meta")
    with pytest.raises(ValueError, match="teacher_logits is on meta but student_logits is on cpu"):
        gk.gopd_loss(zs, y, meta, zr, backend="torch")


def test_unbuilt_backend_says_how_to_build(monkeypatch):
    from gopd_kernels import backends
    for name in ("cuda", "triton", "cpu"):
        if backends.is_available(name):
            continue
        with pytest.raises(ValueError) as info:
            call(backend=name)
        assert f"backend={name!r} is not available here" in str(info.value)


def fl_inputs():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(N, 6, generator=g), torch.randn(V, 6, generator=g)
    return h, w, torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("overrides,message", [
    (dict(student_weight=torch.zeros(V, 7)), "student_hidden: hidden size 6 does not match student_weight"),
    (dict(student_weight=torch.zeros(V)), "student_weight: expected at least 2 dimension"),
    (dict(student_hidden=torch.zeros(N + 1, 6)), "student_hidden: expected leading shape (4,)"),
    (dict(teacher_weight=None), "teacher_hidden and teacher_weight go together"),
    (dict(teacher_weight=torch.zeros(V - 2, 6)), "teacher_weight: vocabulary size 8 is smaller"),
    (dict(student_bias=torch.zeros(V + 1)), "student_bias: expected shape (10,)"),
    (dict(chunk_size=0), "chunk_size: expected None or a positive int"),
    (dict(lam=2.0), "lam=2.0 needs a reference model: pass ref_hidden/ref_weight"),
    (dict(impl="tiles"), "impl: expected one of ('auto', 'chunked', 'onchip'), got 'tiles'"),
    (dict(impl="onchip", backend="cpu"), "impl='onchip': the on-chip kernels are Triton's"),
    (dict(reduction="seq-mean-token-sum"), "targets: reduction='seq-mean-token-sum' needs targets of shape"),
])
def test_fused_linear_errors(overrides, message):
    h, w, y = fl_inputs()
    kw = dict(student_hidden=h, student_weight=w, targets=y, teacher_hidden=h, teacher_weight=w, backend="torch")
    kw.update(overrides)
    with pytest.raises((ValueError, TypeError)) as info:
        gk.fused_linear_gopd_loss(**kw)
    assert message in str(info.value)


def test_fused_linear_logprobs_errors():
    h, w, y = fl_inputs()
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        gk.fused_linear_logprobs(h, w, y, temperature=-1.0)
    with pytest.raises(ValueError, match="hidden: hidden size 6 does not match weight"):
        gk.fused_linear_logprobs(h, torch.zeros(V, 5), y)
