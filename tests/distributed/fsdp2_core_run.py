"""Run by test_sharded.py in a subprocess: ScaledEMA on an FSDP2 module without Lightning (one gloo process).

FSDP2 keeps a module gathered after a no-grad forward when ``reshard_after_forward=False`` (a teacher), and the
root after an evaluation forward: a write into the shards is invisible to the next forward until the module is
resharded. Checks that a teacher update and an evaluation swap are seen by the very next forward.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_emascale import ScaledEMA


def net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = net()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)


def shard(model: Model, mesh) -> None:
    for part in (model.student, model.teacher):
        fully_shard(part[0], mesh=mesh, reshard_after_forward=False)
        fully_shard(part, mesh=mesh, reshard_after_forward=False)


def plain_of(module: torch.nn.Module, tensors) -> torch.nn.Module:
    plain = net()
    plain.load_state_dict({name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in tensors.items()})
    return plain


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    # Teacher mode: the teacher's next forward sees the update.
    model = Model()
    shard(model, mesh)
    teacher_shards = dict(model.teacher.named_parameters())  # kept: the module's attributes change when gathered
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.5)
    ema = ScaledEMA(model, optimizer, momentum=0.5, base_batch_size=8, teachers={"student": "teacher"})
    for _ in range(3):
        with torch.no_grad():
            model.teacher(x)  # left gathered (reshard_after_forward=False)
        ema.count_samples(8)
        model.student(x).square().mean().backward()
        optimizer.step()  # the post-hook updates the teacher's shards
        optimizer.zero_grad()
        with torch.no_grad():
            expected = plain_of(model.teacher, teacher_shards)(x)
            torch.testing.assert_close(model.teacher(x), expected, rtol=0, atol=1e-6)

    # Polyak mode: an evaluation swap after a no-grad forward left the module gathered.
    model = Model()
    student = model.student
    shard(model, mesh)
    shards = dict(student.named_parameters())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    ema = ScaledEMA(student, optimizer, momentum=0.5, base_batch_size=8)
    for _ in range(3):
        ema.count_samples(8)
        student(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        raw_out = plain_of(student, shards)(x)
        student(x)  # gathered now
        with ema.swapped():
            ema_out = student(x)
        after = student(x)
    expected = plain_of(student, ema.ema_state_dict())(x)
    torch.testing.assert_close(ema_out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ema_out, raw_out)
    torch.testing.assert_close(after, raw_out, rtol=0, atol=1e-6)
    try:
        ema.functional_call(student, (x,))
    except NotImplementedError as err:
        assert "functional_call is not supported for a sharded module" in str(err)
    else:
        raise AssertionError("functional_call on a sharded module did not raise")
    check_moved_shards(mesh)
    check_errors(mesh)
    dist.destroy_process_group()
    print("ok")


def check_moved_shards(mesh) -> None:
    """FSDP2 re-creates a parameter's local piece on a dtype or device move: the teacher pairs and the offloaded
    copy follow it (the EMA's own groups too), so an update still reads and writes the module's shards."""
    for teacher_mode, offload in ((True, False), (False, True), (False, False)):
        model = Model()
        shard(model, mesh)
        if teacher_mode:
            ema = ScaledEMA(model, momentum=0.5, base_batch_size=8, teachers={"student": "teacher"})
        else:
            ema = ScaledEMA(model.student, momentum=0.5, base_batch_size=8, offload=offload)
        model.to(torch.float64)  # new local pieces
        with torch.no_grad():
            for p in model.student.parameters():
                p.to_local().add_(1.0)  # the student moves away from its EMA
        before = (
            [p.to_local().clone() for p in model.teacher.parameters()]
            if teacher_mode
            else [a.clone() for a in ema.averager.averages]
        )
        student = [p.to_local().clone() for p in model.student.parameters()]
        ema.count_samples(8)
        ema.end_step()
        if not teacher_mode:
            ema.averager.flush()  # an offloaded update runs in a host thread: wait for it, as every reader does
        after = [p.to_local() for p in model.teacher.parameters()] if teacher_mode else ema.averager.averages
        for old, new, online in zip(before, after, student):
            torch.testing.assert_close(new.double(), 0.5 * old.double() + 0.5 * online, rtol=0, atol=1e-6)


def raises(error: type, match: str, build) -> None:
    try:
        build()
    except error as err:
        assert match in str(err), str(err)
    else:
        raise AssertionError(f"no {error.__name__} matching {match!r}")


def check_errors(mesh) -> None:
    model = Model()
    shard(model, mesh)
    raises(
        ValueError,
        "flat_parameters=True is not supported for a sharded module",
        lambda: ScaledEMA(model.student, momentum=0.9, flat_parameters=True),
    )
    raises(
        ValueError,
        "a post-hoc EMA (`sigma_rels`) is not supported for a sharded module",
        lambda: ScaledEMA(
            model.student, momentum=None, sigma_rels=[0.05], snapshot_every_samples=8, snapshot_dir="unused"
        ),
    )
    # a teacher that is not sharded like its online twin
    model = Model()
    fully_shard(model.student, mesh=mesh)
    raises(
        ValueError,
        "`0.weight` is not sharded in the teacher and sharded as (Shard(dim=0),)",
        lambda: ScaledEMA(model, momentum=0.9, teachers={"student": "teacher"}),
    )
    # FSDP1: flat parameters without the original ones; an fp32 EMA of bf16 parameters; a teacher that shares an
    # FSDP1 unit with other parameters (it would hold other slices than its twin on each rank)
    from torch.distributed.fsdp import FullyShardedDataParallel

    cpu = torch.device("cpu")
    flat = FullyShardedDataParallel(net(), device_id=cpu, use_orig_params=False)
    raises(ValueError, "FSDP1 with `use_orig_params=False` hides the parameters", lambda: ScaledEMA(flat, momentum=0.9))
    low = FullyShardedDataParallel(net().bfloat16(), device_id=cpu, use_orig_params=True)
    message = "An fp32 EMA of FSDP1 parameters held in torch.bfloat16 is not supported"
    raises(ValueError, message, lambda: ScaledEMA(low, momentum=0.9))
    ScaledEMA(low, momentum=0.9, ema_precision="model")  # allowed: the EMA is kept in bf16
    together = FullyShardedDataParallel(Model(), device_id=cpu, use_orig_params=True)
    message = (
        "Under FSDP1, teacher 'teacher' and its online module 'student' must each be FSDP units of their own, and"
        " ['student', 'teacher'] is not"
    )
    raises(ValueError, message, lambda: ScaledEMA(together, momentum=0.9, teachers={"student": "teacher"}))


if __name__ == "__main__":
    main()
