"""CRD (contrastive representation distillation): the NCE loss and the memory bank against a numpy
implementation of Tian et al.'s eq. 18 and RepDistiller's memory, negatives, K scaling, gradients,
checkpointed buffers, errors and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xkd
from xkd.config import ConfigError, OptimizerConfig, TrainConfig
from xkd.data.base import TensorImageDataset
from xkd.distill.base import DistillContext, build_distiller
from xkd.distill.crd import (
    CRD,
    PAPER_K,
    contrast_exp,
    gather_updates,
    momentum_update,
    nce_loss,
    resolve_nce_k,
    sample_negatives,
)
from xkd.engine.checkpoint import load_checkpoint, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN = 16  # tiny_data(16): labels 0, 1, 2, 0, ... -> classes of 6, 5 and 5 images


def build(tiny_pair, tiny_data, params=None, n=N_TRAIN):
    student, teacher = tiny_pair
    ctx = DistillContext(sample=torch.zeros(2, 1, 16, 16), train=tiny_data(n), seed=3)
    return build_distiller("crd", student, teacher, {"feat_dim": 8, **(params or {})}, ctx)


def batch_of(tiny_data, index, n=N_TRAIN):
    return tiny_data(n).batch(torch.tensor(index))


# ---------------------------------------------------------------------------------------------- numpy reference


def np_nce(p: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    """Eq. 18 as RepDistiller computes it: P(D=1 | positive) = h / (h + K/N), P(D=0 | negative) =
    (K/N) / (h + K/N); the loss is minus the log-likelihood summed over the batch, divided by B."""
    b, k = p.shape[0], p.shape[1] - 1
    m_pn = k / n_data
    total = 0.0
    for i in range(b):
        total += np.log(p[i, 0] / (p[i, 0] + m_pn + eps))
        for j in range(1, k + 1):
            total += np.log(m_pn / (p[i, j] + m_pn + eps))
    return -total / b


def np_side(anchor, memory, rows, t, n_data, z=None):
    """exp(memory[rows] . anchor / T) / Z with Z = mean * N (set from this batch when not given)."""
    e = np.exp(np.einsum("bkd,bd->bk", memory[rows], anchor) / t)
    z = e.mean() * n_data if z is None else z
    return np_nce(e / z, n_data), z


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- loss


def test_nce_loss_matches_numpy_and_a_hand_value():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 6, generator=g) * 1e-3
    assert float(nce_loss(p, 100)) == pytest.approx(np_nce(p.double().numpy(), 100), rel=1e-5)
    # one image, one negative, N = 2: K P_n = 1/2; h+ = 1/2, h- = 1/2 -> -(log(1/2) + log(1/2)) = 2 log 2
    assert float(nce_loss(torch.tensor([[0.5, 0.5]]), 2)) == pytest.approx(2 * np.log(2), rel=1e-5)


def test_dense_and_gathered_scores_agree_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    memory = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    rows = torch.randint(0, 50, (5, 7), generator=g)
    anchor0 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    expected = np.exp(np.einsum("bkd,bd->bk", memory.double().numpy()[rows.numpy()], anchor0.double().numpy()) / 0.07)
    out = {}
    for dense in (True, False):  # one product against the whole memory, or RepDistiller's gathered rows
        anchor = anchor0.clone().requires_grad_()
        e = contrast_exp(anchor, memory, rows, 0.07, dense=dense)
        (e / e.sum()).pow(2).sum().backward()
        assert np.allclose(e.detach().double().numpy(), expected, rtol=1e-4)
        out[dense] = anchor.grad
    assert torch.allclose(out[True], out[False], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dense_ratio", [8, 0])  # the memory scored by one product (N <= 8 (K+1)) or gathered
def test_contrast_and_memory_update_match_numpy(dense_ratio, tiny_pair, tiny_data, monkeypatch):
    monkeypatch.setattr("xkd.distill.crd.DENSE_RATIO", dense_ratio)
    d = build(tiny_pair, tiny_data, {"nce_m": 0.25, "nce_t": 0.1})
    head = d.head
    g = torch.Generator().manual_seed(1)
    v_s, v_t = F.normalize(torch.randn(3, 8, generator=g), dim=1), F.normalize(torch.randn(3, 8, generator=g), dim=1)
    v_s.requires_grad_()
    index = torch.tensor([0, 4, 8])  # classes 0, 1, 2
    negatives = torch.tensor([[1, 2, 4, 5], [0, 2, 3, 5], [0, 1, 3, 4]])
    mem_s, mem_t = head.memory_s.double().numpy().copy(), head.memory_t.double().numpy().copy()
    rows = np.concatenate([index.numpy()[:, None], negatives.numpy()], axis=1)
    a, b = v_s.detach().double().numpy(), v_t.double().numpy()

    d.train()
    got = d.contrast(v_s, v_t, index, negatives)
    got.backward()  # after the memory update: the backward pass must read the memory as it was
    loss_s, z_s = np_side(a, mem_t, rows, 0.1, N_TRAIN)  # the student's embedding against the teacher's memory
    loss_t, z_t = np_side(b, mem_s, rows, 0.1, N_TRAIN)
    assert float(got.detach()) == pytest.approx(loss_s + loss_t, rel=1e-4)
    v_ref = v_s.detach().clone().requires_grad_()
    old_rows = torch.from_numpy(mem_t[rows]).float()
    nce_loss(torch.exp(torch.einsum("bkd,bd->bk", old_rows, v_ref) / 0.1) / z_s, N_TRAIN).backward()
    assert torch.allclose(v_s.grad, v_ref.grad, rtol=1e-4, atol=1e-6)
    assert float(head.z_s) == pytest.approx(z_s, rel=1e-4) and float(head.z_t) == pytest.approx(z_t, rel=1e-4)

    # the rows of the batch's images moved towards the new embeddings, the others did not
    new_s, new_t = mem_s.copy(), mem_t.copy()
    new_s[index.numpy()] = unit(0.25 * mem_s[index.numpy()] + 0.75 * a)
    new_t[index.numpy()] = unit(0.25 * mem_t[index.numpy()] + 0.75 * b)
    assert np.allclose(head.memory_s.numpy(), new_s, atol=1e-6)
    assert np.allclose(head.memory_t.numpy(), new_t, atol=1e-6)

    # Z is fixed after the first step; in eval mode the memory is read, not written
    d.eval()
    before = head.memory_s.clone()
    got = d.contrast(v_s.detach(), v_t, index, negatives)
    loss_s, _ = np_side(a, new_t, rows, 0.1, N_TRAIN, z_s)
    loss_t, _ = np_side(b, new_s, rows, 0.1, N_TRAIN, z_t)
    assert float(got) == pytest.approx(loss_s + loss_t, rel=1e-4)
    assert torch.equal(head.memory_s, before)


def test_forward_matches_an_independent_computation(tiny_pair, tiny_data, monkeypatch):
    student, teacher = tiny_pair
    d = build((student, teacher), tiny_data, {"beta": 0.5, "ce_weight": 0.3, "kd_weight": 2.0})
    negatives = torch.tensor([[1, 2, 4, 5, 7, 8, 10, 11, 13, 14], [0, 2, 3, 5, 6, 8, 9, 11, 12, 14]])
    monkeypatch.setattr("xkd.distill.crd.sample_negatives", lambda *a, **k: negatives)
    batch = batch_of(tiny_data, [3, 7])  # classes 0 and 1
    mem_s, mem_t = d.head.memory_s.double().numpy().copy(), d.head.memory_t.double().numpy().copy()
    d.eval()  # BatchNorm statistics fixed, memory not written
    with torch.no_grad():
        _, terms = d(batch)
        # the penultimate features by direct calls: the student's flattened blocks output, the
        # teacher's pooled layer3 output (the inputs of their classifiers)
        f_s = student.blocks(batch.images).flatten(1)
        x = teacher.relu(teacher.bn1(teacher.conv1(batch.images)))
        f_t = teacher.layer3(teacher.layer2(teacher.layer1(x))).mean(dim=(2, 3))
        s_logits, t_logits = student(batch.images), teacher(batch.images)
    np64 = lambda t: t.detach().double().numpy()  # noqa: E731
    v_s = unit(np64(f_s) @ np64(d.head.embed_s.weight).T + np64(d.head.embed_s.bias))
    v_t = unit(np64(f_t) @ np64(d.head.embed_t.weight).T + np64(d.head.embed_t.bias))
    rows = np.concatenate([[[3], [7]], negatives.numpy()], axis=1)
    crd = np_side(v_s, mem_t, rows, 0.07, N_TRAIN)[0] + np_side(v_t, mem_s, rows, 0.07, N_TRAIN)[0]
    assert set(terms) == {"ce", "crd", "kd"}
    assert float(terms["crd"]) == pytest.approx(0.5 * crd, rel=1e-4)
    assert float(terms["ce"]) == pytest.approx(0.3 * float(F.cross_entropy(s_logits, batch.labels)), rel=1e-5)
    p_t, log_p_s = F.softmax(t_logits / 4, 1), F.log_softmax(s_logits / 4, 1)
    kd = float((p_t * (p_t.log() - log_p_s)).sum(1).mean()) * 16
    assert float(terms["kd"]) == pytest.approx(2.0 * kd, rel=1e-4)
    for model in (student, teacher):  # hooks removed after use
        assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- negatives and K


def test_negatives_are_distinct_images_of_other_classes():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2])  # class sizes 4, 3, 5
    order = torch.argsort(labels, stable=True)
    count = torch.bincount(labels)
    start = torch.cumsum(count, 0) - count
    g = torch.Generator().manual_seed(0)
    batch_labels = torch.tensor([0, 1, 2, 2])
    neg = sample_negatives(batch_labels, order, start, count, 7, g)  # N - n_max = 12 - 5 = 7
    assert neg.shape == (4, 7)
    for row, y in zip(neg, batch_labels):
        assert len(set(row.tolist())) == 7
        assert all(int(labels[j]) != int(y) for j in row)
    # for an image of the largest class K = N - n_max takes every image of the other classes
    assert sorted(neg[2].tolist()) == sorted(torch.nonzero(labels != 2).flatten().tolist())
    # each other-class image is drawn about equally often
    many = sample_negatives(torch.zeros(4000, dtype=torch.long), order, start, count, 2, g)
    freq = torch.bincount(many.flatten(), minlength=12)[labels != 0].double() / many.numel()
    assert torch.allclose(freq, torch.full_like(freq, 1 / 8), atol=0.02)


def test_k_scales_with_the_data_and_a_too_large_k_fails_before_training(tiny_pair, tiny_data):
    assert build(tiny_pair, tiny_data).nce_k == N_TRAIN - 6  # the largest class has 6 of the 16 images
    assert resolve_nce_k(None, torch.arange(50_000) % 100) == PAPER_K  # CIFAR-100's size: the paper's K
    assert resolve_nce_k(None, torch.arange(1_000) % 10) == 900
    assert build(tiny_pair, tiny_data, {"nce_k": 10}).nce_k == 10
    with pytest.raises(ConfigError, match="nce_k = 11 .* only 10 images of other classes"):
        build(tiny_pair, tiny_data, {"nce_k": 11})
    with pytest.raises(ConfigError, match="two classes"):
        resolve_nce_k(None, torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- the distiller


def test_gradients_reach_the_student_and_both_heads_never_the_teacher(tiny_pair, tiny_data):
    student, teacher = tiny_pair
    d = build((student, teacher), tiny_data, {"ce_weight": 0.0})
    d.train()
    _, terms = d(batch_of(tiny_data, [0, 1, 2, 5]))
    terms["crd"].backward()
    for m in (student.blocks[0][0], d.head.embed_s, d.head.embed_t):
        assert m.weight.grad is not None, m
    assert student.blocks[0][0].weight.grad.abs().sum() > 0
    assert d.head.embed_s.weight.grad.abs().sum() > 0 and d.head.embed_t.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad is None  # the feature is the classifier's input
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert set(dict(d.trainable_modules().named_parameters())) >= {"crd.embed_s.weight", "crd.embed_t.weight"}


def test_memory_bank_is_a_checkpointed_buffer_and_resume_restores_it(tiny_pair, tiny_data, tmp_path):
    d = build(tiny_pair, tiny_data)
    state = d.trainable_modules().state_dict()
    assert {"crd.memory_s", "crd.memory_t", "crd.z_s", "crd.z_t"} <= set(state)
    assert not {k for k in state if k.endswith(("labels", "order", "count", "start"))}  # rebuilt from the data
    assert d.head.memory_s.shape == (N_TRAIN, 8)
    assert {"head.memory_s", "head.memory_t"} <= {n for n, _ in d.named_buffers()}  # follow .to(device)
    assert d.to(torch.float64).head.memory_s.dtype == torch.float64
    d.to(torch.float32)

    cfg = TrainConfig(epochs=1, batch_size=4, optimizer=OptimizerConfig("sgd", lr=0.05), max_steps_per_epoch=3)
    xkd.Trainer(d, tiny_data(N_TRAIN), tiny_data(6), cfg, checkpoint_dir=tmp_path, progress=False).fit()
    assert float(d.head.z_s) > 0
    fresh = build(tiny_pair, tiny_data)
    assert not torch.equal(fresh.head.memory_s, d.head.memory_s)
    load_weights(fresh.trainable_modules(), load_checkpoint(tmp_path / "last.pt")["model"], "last.pt")
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(fresh.head, name), getattr(d.head, name)), name


def test_a_resumed_run_draws_the_negatives_the_uninterrupted_one_draws(tiny_pair, tiny_data, monkeypatch):
    import xkd.distill.crd as crd_module

    drawn: list[torch.Tensor] = []
    sample = crd_module.sample_negatives
    monkeypatch.setattr(crd_module, "sample_negatives", lambda *a: drawn.append(sample(*a)) or drawn[-1])
    batches = [batch_of(tiny_data, [i, i + 1, i + 2]) for i in (0, 3, 6, 9)]

    def steps(d, which):
        d.train()
        for b in which:
            d(b)

    straight = build(tiny_pair, tiny_data)
    steps(straight, batches)
    uninterrupted, drawn[:] = list(drawn), []
    first = build(tiny_pair, tiny_data)
    steps(first, batches[:2])
    state = first.trainable_modules().state_dict()
    assert int(state["crd_state.step"]) == 2
    resumed = build(tiny_pair, tiny_data)
    load_weights(resumed.trainable_modules(), state, "state")
    assert resumed.counter.count == 2
    steps(resumed, batches[2:])
    assert len(drawn) == 4 and all(torch.equal(a, b) for a, b in zip(uninterrupted, drawn, strict=True))


def test_a_few_steps_reduce_the_loss(tiny_pair, tiny_data):
    d = build(tiny_pair, tiny_data, {"ce_weight": 0.0})
    opt = torch.optim.Adam(d.trainable_modules().parameters(), lr=1e-2)
    data = tiny_data(N_TRAIN)
    d.train()
    epoch_losses = []
    for _ in range(15):  # epochs over the 16 images, 4 batches each: every memory row is refreshed
        total = 0.0
        for index in torch.arange(N_TRAIN).split(4):
            _, terms = d(data.batch(index))
            opt.zero_grad()
            terms["crd"].backward()
            opt.step()
            total += float(terms["crd"].detach())
        epoch_losses.append(total / 4)
    assert epoch_losses[-1] < 0.8 * epoch_losses[0]


def test_clear_errors(tiny_pair, tiny_data):
    student, teacher = tiny_pair
    d = build_distiller("crd", student, teacher)
    assert isinstance(d, CRD)
    with pytest.raises(RuntimeError, match="setup"):
        d(batch_of(tiny_data, [0, 1]))
    with pytest.raises(ConfigError, match="training split"):
        d.setup(DistillContext(sample=torch.zeros(2, 1, 16, 16)))
    d = build(tiny_pair, tiny_data)
    hand_made = batch_of(tiny_data, [0, 1])
    hand_made.indices = None
    with pytest.raises(ValueError, match="indices"):
        d(hand_made)
    one_class = TensorImageDataset(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="two classes .* has 4 images, all of one class"):
        d.setup(DistillContext(sample=torch.zeros(2, 1, 16, 16), train=one_class))
    empty = TensorImageDataset(torch.rand(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match="two classes .* has no images"):
        d.setup(DistillContext(sample=torch.zeros(2, 1, 16, 16), train=empty))


def test_indices_outside_the_memory_bank_are_one_clear_error_in_training_and_evaluation(tiny_pair, tiny_data):
    d = build(tiny_pair, tiny_data)
    beyond = batch_of(tiny_data, [3, N_TRAIN + 2], n=N_TRAIN + 4)  # a batch of a larger (other) split
    for training in (True, False):
        d.train(training)
        with pytest.raises(ValueError, match=f"indices 3..{N_TRAIN + 2} are not indices of the {N_TRAIN} training"):
            d(beyond)
    d.train()
    d(batch_of(tiny_data, [0, 1]))  # checked once in training, then never again (no host sync per step)
    assert d._index_checked
    d.eval()
    with pytest.raises(ValueError, match="not indices of the"):  # evaluation checks every batch
        d(beyond)


def test_layers_pick_other_features(tiny_pair, tiny_data):
    d = build(tiny_pair, tiny_data, {"layers": [["blocks.1", "layer2"]]})
    # 4-D outputs are globally average-pooled: the widths are the channel counts
    assert (d.head.embed_s.in_features, d.head.embed_t.in_features) == (8, 8)
    _, terms = d(batch_of(tiny_data, [0, 1, 2]))
    assert torch.isfinite(terms["crd"])


@pytest.mark.parametrize(
    "params",
    [{"beta": -1.0}, {"nce_t": 0.0}, {"nce_m": 1.0}, {"nce_k": 0}, {"feat_dim": 0}, {"temperature": -1.0}, {"k": 3}],
)
def test_bad_params_are_config_errors(params, tiny_pair):
    with pytest.raises(ConfigError):
        build_distiller("crd", *tiny_pair, params)


def test_gathered_updates_give_a_repeated_image_its_first_row(monkeypatch):
    """Two ranks (simulated): the sampler pads rank 1's batch with image 2, already in rank 0's. Every
    copy of image 2 carries rank 0's row, so the bank's update is the same whichever copy lands last,
    and equals updating each image once with its first row."""
    import xkd.distill.crd as C

    ranks = {
        0: (torch.tensor([2, 5, 0]), torch.arange(6.0).view(3, 2)),
        1: (torch.tensor([4, 2, 1]), -torch.arange(6.0).view(3, 2)),
    }

    def all_gather(parts, t):  # rank 0's call: every rank's tensor of the kind passed (index or values)
        for r, part in enumerate(parts):
            part.copy_(ranks[r][0] if t.dtype == torch.long else ranks[r][1])

    monkeypatch.setattr(C, "world_size", lambda: 2)
    monkeypatch.setattr(C.dist, "all_gather", all_gather)
    index, values = gather_updates(*ranks[0], rows=7)
    assert index.tolist() == [2, 5, 0, 4, 2, 1]
    assert torch.equal(values[4], values[0]) and torch.equal(values[0], torch.tensor([0.0, 1.0]))
    assert torch.equal(values[3], torch.tensor([-0.0, -1.0]))  # rank 1's own images keep their rows
    memory = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    once = momentum_update(memory.clone(), torch.tensor([2, 5, 0, 4, 1]), values[[0, 1, 2, 3, 5]], 0.5)
    assert torch.equal(momentum_update(memory.clone(), index, values, 0.5), once)


DDP_SCRIPT = """
import sys
import torch
import xkd
from xkd.config import ModelConfig, OptimizerConfig, TrainConfig
from xkd.data.base import TensorImageDataset
from xkd.distill.base import DistillContext, build_distiller
from xkd.engine.distributed import init_distributed
from xkd.models import build_model

info = init_distributed()
torch.manual_seed(0)
student = build_model(ModelConfig("kdfmv_cnn", params={"widths": [4, 8, 8]}), 3, 1, 16)
teacher = build_model(ModelConfig("cifar_resnet", params={"depth": 8, "width": 4}), 3, 1, 16)
g = torch.Generator().manual_seed(0)
data = TensorImageDataset(torch.rand(16, 1, 16, 16, generator=g), torch.arange(16) % 3)
d = build_distiller("crd", student, teacher, {"feat_dim": 8}, DistillContext(sample=torch.zeros(2, 1, 16, 16), train=data))
init = d.head.memory_s.clone()
cfg = TrainConfig(epochs=1, batch_size=4, optimizer=OptimizerConfig("sgd", lr=0.05))
xkd.Trainer(d, data, data, cfg, progress=False).fit()
torch.save({"init": init, **d.trainable_modules().state_dict()}, sys.argv[1] + f"/rank{info.rank}.pt")
"""


@pytest.mark.slow
def test_two_cpu_ranks_keep_one_memory_bank(tmp_path, torchrun_two_cpu_ranks):
    """Under torchrun each rank sees half of the images; the memory updates are gathered, so both
    ranks end with the same banks, every image's row updated, and the same weights."""
    script = tmp_path / "crd_ddp.py"
    script.write_text(DDP_SCRIPT)
    torchrun_two_cpu_ranks(script, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    changed = (r0["crd.memory_s"] - r0["init"]).abs().sum(dim=1) > 0
    assert bool(changed.all()), "some images' memory rows were never updated"
    assert float(r0["crd.z_s"]) > 0
