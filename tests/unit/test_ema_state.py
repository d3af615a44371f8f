import warnings

import pytest
import torch

from lightning_emascale._averager import Update
from lightning_emascale._polyak import PolyakEMA
from lightning_emascale._store import reference_update


def _tensors(dtype=torch.float32):
    torch.manual_seed(0)
    return [
        ("conv.weight", torch.randn(8, 4, 3, 3, dtype=dtype)),
        ("conv_cl.weight", torch.randn(8, 4, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)),
        ("big.weight", torch.randn(300, 1000, dtype=dtype)),  # several chunks and two staging blocks
        ("bias", torch.randn(7, dtype=dtype)),
        ("transposed", torch.randn(5, 9, dtype=dtype).t()),  # not dense in any memory format
        ("bn.num_batches_tracked", torch.tensor(3)),
        ("scalar", torch.tensor(1.5, dtype=dtype)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_foreach_update_equals_reference_loop(dtype):
    named = _tensors(dtype)
    state = PolyakEMA(named)
    reference = [e.clone() for e in state.averages]
    for step in range(5):
        with torch.no_grad():
            for _, tensor in named:
                tensor.add_(
                    torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype) if tensor.is_floating_point() else 1
                )
        decay = 0.9 ** (step + 1)
        state.update(Update(decay))
        reference_update(reference, [t for _, t in named], decay)
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_gathered_mixed_update_of_the_gpu_path_equals_reference_loop(dtype):
    """The GPU's mixed-dtype path (one same-dtype cat per block, then one cast), forced on the CPU."""
    named = _tensors(dtype)
    state = PolyakEMA(named)
    for group in state.store.groups:
        if group.mixed:
            group.gathered = torch.empty(group.staging.numel(), dtype=group.model_dtype)
    assert any(group.gathered is not None for group in state.store.groups)
    reference = [e.clone() for e in state.averages]
    for step in range(3):
        with torch.no_grad():
            for _, tensor in named:
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype))
        state.update(Update(0.8 ** (step + 1)))
        reference_update(reference, [t for _, t in named], 0.8 ** (step + 1))
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name


def test_low_precision_ema_is_fp32_and_moves():
    # 1 - rho = 1e-4 is below bf16 resolution near 1.0: a bf16 EMA would never move.
    weight = torch.ones(1000, dtype=torch.bfloat16)
    fp32 = PolyakEMA([("w", weight)], precision="fp32")
    same = PolyakEMA([("w", weight)], precision="model")
    assert fp32.averages[0].dtype == torch.float32 and same.averages[0].dtype == torch.bfloat16
    with torch.no_grad():
        weight.fill_(2.0)
    for _ in range(10):
        fp32.update(Update(0.9999))
        same.update(Update(0.9999))
    expected = 2.0 - 0.9999**10
    assert fp32.averages[0][0].item() == pytest.approx(expected, rel=1e-6)
    assert same.averages[0][0].item() == 1.0  # what the "model" precision costs


def test_integer_buffers_are_copied_not_averaged():
    counter = torch.tensor(3)
    state = PolyakEMA([("n", counter)])
    counter += 10
    state.update(Update(0.5))
    assert state.averages[0].item() == 13 and state.averages[0].dtype == torch.int64


def test_swap_restores_bit_identical_raw_weights():
    named = _tensors(torch.bfloat16)
    state = PolyakEMA(named)
    with torch.no_grad():
        for _, tensor in named:
            tensor.mul_(3) if tensor.is_floating_point() else tensor.add_(1)
    state.update(Update(0.7))
    raw = [t.clone() for _, t in named]
    with state.swapped():
        for (_, tensor), ema in zip(named, state.averages):
            assert torch.equal(tensor, ema.to(tensor.dtype))
        assert all(torch.equal(a, b) for a, b in zip(state.raw_tensors(), raw))
        with pytest.raises(RuntimeError, match="already swapped"):
            with state.swapped():
                pass
    for (_, tensor), before in zip(named, raw):
        assert torch.equal(tensor, before)


def test_load_state_dict_checks_names_and_shapes():
    state = PolyakEMA([("a", torch.zeros(2)), ("b", torch.zeros(3))])
    with pytest.raises(KeyError, match=r"missing \['b'\], unexpected \['c'\]"):
        state.load_averages({"a": torch.ones(2), "c": torch.ones(3)})
    with pytest.raises(ValueError, match=r"saved EMA of 'b' has shape \(4,\), the model's is \(3,\)"):
        state.load_averages({"a": torch.ones(2), "b": torch.ones(4)})
    state.load_averages({"a": torch.ones(2), "b": torch.full((3,), 2.0)})
    assert state.averages[1].tolist() == [2.0, 2.0, 2.0]


def test_teacher_state_lerps_every_pair_toward_its_online_twin():
    from lightning_emascale._teacher import TeacherEMA

    g = torch.Generator().manual_seed(0)
    online = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(4, generator=g).bfloat16()]
    teacher = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(4, generator=g)]  # fp32 twin
    before = [t.clone() for t in teacher]
    state = TeacherEMA(list(zip(teacher, online)))
    assert len(state.mixed) == 1  # the fp32 teacher of a bf16 tensor is lerped on its own, in fp32
    state.update(Update(0.75))
    for t, b, o in zip(teacher, before, online):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * o.float(), rtol=1e-6, atol=1e-7)
    assert teacher[2].dtype == torch.float32 and online[2].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("teachers", "match"),
    [
        ({"a": "a"}, r"`teachers` maps 'a' to itself: the teacher must be a separate, frozen copy"),
        ({"a": "t", "b": "t"}, r"`teachers` maps both 'a' and 'b' to 't': each teacher follows one online module"),
    ],
)
def test_teacher_pairs_must_be_one_to_one(teachers, match):
    from lightning_emascale import ScaledEMA  # the self-map is an option's check, stated once

    module = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2), "t": torch.nn.Linear(2, 2)})
    module["t"].requires_grad_(False)
    with pytest.raises(ValueError, match=match):
        ScaledEMA(module, teachers=teachers)


class _Zoo(torch.nn.Module):
    """Small and big, channels-last, tied, non-contiguous and empty tensors, integer and float buffers."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = torch.nn.ModuleList(torch.nn.Linear(7, 5) for _ in range(20))
        self.big = torch.nn.Linear(600, 300)  # 180K elements: over the small-tensor size, several blocks
        self.conv = torch.nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
        self.tied = self.small[0]
        self.transposed = torch.nn.Parameter(torch.randn(9, 5).t())  # dense in no memory format
        self.empty = torch.nn.Parameter(torch.empty(0))
        self.bn = torch.nn.BatchNorm1d(5)
        self.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block", [1 << 10, 1 << 20])
def test_the_flat_fast_path_equals_the_reference_bit_for_bit(dtype, block, monkeypatch):
    from lightning_emascale import _flat_group

    monkeypatch.setattr(_flat_group, "block_elements", lambda device_type, total: block)  # many blocks, or one
    model = _Zoo(dtype)
    state = PolyakEMA.from_module(model)
    reference = [average.clone() for average in state.averages]
    storages = {a.untyped_storage().data_ptr() for a in state.averages if a.is_floating_point() and a.numel()}
    assert len(storages) <= 3  # one flat buffer for the parameters, one for the buffers, the non-dense tensor
    for step in range(4):
        with torch.no_grad():
            for tensor in state.tracked:
                tensor.add_(
                    torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype) if tensor.is_floating_point() else 1
                )
        state.update(Update(0.8 ** (step + 1)))
        reference_update(reference, state.tracked, 0.8 ** (step + 1))
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name
    assert state.averages[state.index_of_name["conv.weight"]].is_contiguous(memory_format=torch.channels_last)
    assert state.index_of_name["tied.weight"] == state.index_of_name["small.0.weight"]


@pytest.mark.parametrize("copy_on_swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_swap_puts_the_averages_in_and_restores_the_same_storage(dtype, copy_on_swap):
    model = _Zoo(dtype)
    state = PolyakEMA.from_module(model, copy_on_swap=copy_on_swap)
    with torch.no_grad():
        for tensor in state.tracked:
            tensor.mul_(3) if tensor.is_floating_point() else tensor.add_(1)
    state.update(Update(0.5))
    pointers = [tensor.data_ptr() for tensor in state.tracked]
    raw = [tensor.detach().clone() for tensor in state.tracked]
    with state.swapped():
        for name, tensor, average in zip(state.names, state.tracked, state.averages):
            assert torch.equal(tensor, average.to(tensor.dtype)), name
            assert tensor.dtype == raw[state.names.index(name)].dtype, name
            parameter = isinstance(tensor, torch.nn.Parameter)
            # zero copy: a parameter of the EMA's dtype holds the average's own storage; buffers are copied
            shares = parameter and not copy_on_swap and tensor.dtype == average.dtype
            if tensor.numel():
                assert (tensor.data_ptr() == average.data_ptr()) == shares, name
    assert [tensor.data_ptr() for tensor in state.tracked] == pointers
    for name, tensor, before in zip(state.names, state.tracked, raw):
        assert torch.equal(tensor, before), name


def test_refresh_follows_a_module_whose_storage_was_replaced():
    model = _Zoo(torch.float32)
    state = PolyakEMA.from_module(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone() + 1.0  # what module.to(other_device) does
    state.refresh()
    state.update(Update(0.0))  # decay 0: the average becomes the current values
    for name, tensor, average in zip(state.names, state.tracked, state.averages):
        assert torch.equal(average, tensor.to(average.dtype)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_parameters_move_the_model_into_one_buffer_and_match_the_reference(dtype):
    model = _Zoo(dtype)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = PolyakEMA.from_module(model, flat_parameters=True)
    for name, tensor in model.state_dict().items():  # same values, same strides
        assert torch.equal(tensor, before[name]) and tensor.stride() == before[name].stride(), name
    flat = state.store.groups[0].model_flat
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= p.data_ptr() < end for p in model.small.parameters())
    reference = [average.clone() for average in state.averages]
    for _ in range(3):
        sum(p.float().pow(2).sum() for p in model.parameters()).backward()
        optimizer.step()  # optimizer state and grads keep working on the re-pointed parameters
        optimizer.zero_grad()
        state.update(Update(0.7))
        reference_update(reference, state.tracked, 0.7)
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name
    assert all(start <= p.data_ptr() < end for p in model.small.parameters())


def test_flat_parameters_fall_back_with_a_warning_when_the_model_moves_out():
    model = _Zoo(torch.float32)
    state = PolyakEMA.from_module(model, flat_parameters=True)
    reference = [average.clone() for average in state.averages]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone() + 1.0  # load_state_dict(assign=True): adopted again, quietly
    state.update(Update(0.5))
    reference_update(reference, state.tracked, 0.5)
    model.conv.to(memory_format=torch.contiguous_format)  # new strides: the flat layout no longer fits
    with pytest.warns(UserWarning, match="no longer live in the EMA's flat buffer"):
        state.update(Update(0.5))
    reference_update(reference, state.tracked, 0.5)
    for name, fast, slow in zip(state.names, state.averages, reference):
        assert torch.equal(fast, slow), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_update_follows_tensors_whose_storage_or_strides_changed_without_an_attach(dtype):
    model = _Zoo(dtype)
    state = PolyakEMA.from_module(model)
    reference = [average.clone() for average in state.averages]
    with torch.no_grad():
        for parameter in model.small.parameters():
            parameter.data = parameter.data.clone() + 1.0  # what module.to(device) does, small tensors included
    model.conv.to(memory_format=torch.contiguous_format)  # channels-last -> contiguous
    for decay in (0.5, 0.25):
        state.update(Update(decay))  # no refresh() called: the update notices
        reference_update(reference, state.tracked, decay)
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name


def test_a_write_while_swapped_reaches_the_ema_with_a_warning_that_names_it():
    model = _Zoo(torch.float32)
    state = PolyakEMA.from_module(model)
    big = state.names.index("big.weight")
    with pytest.warns(UserWarning, match=r"'big.weight' \(1 tensors\) were written in place while the EMA was"
                      r" swapped in .* `copy_on_swap=True`"):  # fmt: skip
        with state.swapped():
            with torch.no_grad():
                model.big.weight.mul_(0)  # test-time adaptation, an unhooked optimizer
    assert not state.averages[big].any()  # the write landed in the EMA: said, not hidden
    assert model.big.weight.any()  # the training weights came back


def test_with_copy_on_swap_writes_while_swapped_do_not_reach_the_ema():
    model = _Zoo(torch.float32)
    state = PolyakEMA.from_module(model, copy_on_swap=True)
    before = [average.clone() for average in state.averages]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with state.swapped():
            with torch.no_grad():
                model.big.weight.mul_(0)
    assert all(torch.equal(a, b) for a, b in zip(state.averages, before))


@pytest.mark.parametrize("copy_on_swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_refuses_a_graph_built_on_the_other_side_of_a_swap(dtype, copy_on_swap):
    model = _Zoo(dtype)
    state = PolyakEMA.from_module(model, copy_on_swap=copy_on_swap)
    with state.swapped():
        loss = (model.big.weight**2).sum()  # built on the EMA (pow saves the weight), back-propagated after
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = (model.big.weight**2).sum()  # built on the training weights, back-propagated while swapped
    with state.swapped():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_reset_while_swapped_raises_and_changes_nothing():
    model = _Zoo(torch.float32)
    state = PolyakEMA.from_module(model)
    with torch.no_grad():
        model.big.weight.add_(1)
    before = [average.clone() for average in state.averages]
    with state.swapped():
        with pytest.raises(RuntimeError, match=r"reset\(\) while the EMA is swapped into the model: call swap_out"):
            state.reset()
    assert all(torch.equal(a, b) for a, b in zip(state.averages, before))


def test_flat_parameters_refuse_to_untie_tensors_that_share_storage():
    model = _Zoo(torch.float32)
    model.extra = torch.nn.Parameter(torch.empty(0))
    model.extra.data = model.big.weight.data  # tied through separate Parameter objects
    with pytest.raises(ValueError, match=r"`flat_parameters=True` would untie tensors that share memory"):
        PolyakEMA.from_module(model, flat_parameters=True)


def test_a_swap_that_fails_part_way_changes_nothing(monkeypatch):
    model = _Zoo(torch.bfloat16)  # the swap casts each fp32 average to bf16: allocations that can fail
    state = PolyakEMA.from_module(model)
    with torch.no_grad():
        for tensor in state.tracked:
            tensor.add_(1)
    state.update(Update(0.5))
    raw = [tensor.detach().clone() for tensor in state.tracked]
    pointers = [tensor.data_ptr() for tensor in state.tracked]
    calls = []
    real_to = torch.Tensor.to

    def failing_to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(RuntimeError, match="simulated"):
        state.swap_in()
    monkeypatch.undo()
    assert not state.is_swapped
    assert [tensor.data_ptr() for tensor in state.tracked] == pointers
    assert all(torch.equal(tensor, before) for tensor, before in zip(state.tracked, raw))


def test_parameters_tied_through_separate_objects_stay_tied_in_the_swap():
    class TiedAutoencoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(4, 4, bias=False)
            self.dec = torch.nn.Linear(4, 4, bias=False)
            self.dec.weight = torch.nn.Parameter(self.enc.weight.data)  # shared storage, two Parameter objects

    for exclude in (None, ["dec"]):
        model = TiedAutoencoder()
        state = PolyakEMA.from_module(model, exclude=exclude)
        with torch.no_grad():
            model.enc.weight.add_(1)
        state.update(Update(0.5))
        with state.swapped():
            assert model.enc.weight.data_ptr() == model.dec.weight.data_ptr(), exclude  # copied in, still tied
            assert torch.equal(model.enc.weight, state.averages[0]), exclude
        assert model.enc.weight.data_ptr() == model.dec.weight.data_ptr()


def test_a_bf16_swap_inside_inference_mode_leaves_normal_tensors():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    state = PolyakEMA.from_module(model)
    with torch.inference_mode():
        state.swap_in()
    assert not model.weight.is_inference()
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()  # training on the EMA: allowed, not crashed
    state.swap_out()


def test_a_storage_move_seen_by_a_guarded_update_is_followed_by_the_next_plain_one():
    model = torch.nn.Linear(4, 4)
    state = PolyakEMA.from_module(model)
    state.update(Update(0.0))
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()  # module.double().float(), load_state_dict(assign=True)
    state.update(Update(0.0), only_if=torch.tensor(True))
    with torch.no_grad():
        model.weight.fill_(7.0)
        model.bias.fill_(7.0)
    state.update(Update(0.0))  # decay 0: the EMA equals the weights
    assert torch.equal(state.averages[0], model.weight.detach()) and torch.equal(state.averages[1], model.bias)


def test_the_write_warning_points_at_the_callers_line():
    model = torch.nn.Linear(4, 4)
    state = PolyakEMA.from_module(model)
    with pytest.warns(UserWarning, match="written in place") as record:
        with state.swapped():
            with torch.no_grad():
                model.weight.mul_(2)
    assert record[0].filename == __file__


def test_buffers_are_grouped_apart_from_parameters():
    """On a GPU the parameters' update runs on a side stream and the buffers' (which a forward writes) does not."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    state = PolyakEMA.from_module(model)
    kinds = {group.buffers: {id(t) for t in group.models} for group in state.store.groups}
    assert kinds[True] == {id(model[1].running_mean), id(model[1].running_var)}
    assert id(model[0].weight) in kinds[False]


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_update_split_across_threads_equals_the_reference_bit_for_bit(dtype, threads, flat, monkeypatch):
    """On a CPU the update's pieces are dealt to torch's threads, one intra-op thread each: same values, any count
    (also the adopted flat buffer of flat_parameters, cast block by block)."""
    from lightning_emascale import _flat_group

    monkeypatch.setattr(_flat_group, "block_elements", lambda device_type, total: 1 << 10)  # many blocks to deal
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _Zoo(dtype)
        state = PolyakEMA.from_module(model, flat_parameters=flat)
        reference = [average.clone() for average in state.averages]
        for step in range(3):
            with torch.no_grad():
                for tensor in state.tracked:
                    tensor.add_(
                        torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype)
                        if tensor.is_floating_point()
                        else 1
                    )
            state.update(Update(0.7 ** (step + 1)))
            reference_update(reference, state.tracked, 0.7 ** (step + 1))
            assert torch.get_num_threads() == threads  # the caller's count is restored
        shares = state.store._cpu_shares()
        single = flat and dtype == torch.float32  # one lerp over each adopted group, on all threads: not dealt
        assert all(group.single_op for group in state.store.groups) == single
        assert len(shares) == (min(threads, 2) if single else threads)  # single: the loose and integer tensors
        for name, fast, slow in zip(state.names, state.averages, reference):
            assert torch.equal(fast, slow), name
    finally:
        torch.set_num_threads(before)


def test_deal_cuts_the_pieces_in_order_into_even_runs_and_merges_the_lerps():
    from lightning_emascale._cpu_split import deal
    from lightning_emascale._flat_group import Lerp

    calls = []
    pieces = [(10, lambda w, i, k=k: calls.append(k)) for k in range(4)]
    shares = deal(pieces, 2)
    assert [len(share) for share in shares] == [2, 2]
    for index, share in enumerate(shares):
        for piece in share:
            piece(0.5, index)
    assert calls == [0, 1, 2, 3]
    views, models = [torch.zeros(3) for _ in range(3)], [torch.ones(3) for _ in range(3)]
    (merged,) = deal([(3, Lerp(v, m)) for v, m in zip(views, models)], 1)
    assert len(merged) == 1  # one _foreach_lerp_ for the three
    merged[0](0.25, 0)
    assert all(torch.equal(v, torch.full((3,), 0.25)) for v in views)
    assert len(deal(pieces, 8)) == 4  # never more shares than pieces


def test_a_failing_piece_raises_after_every_share_has_finished(monkeypatch):
    from lightning_emascale import _cpu_split

    finished = []

    def fails(weight, index):
        raise RuntimeError("piece failed")

    def slow(weight, index):
        finished.append(index)

    with pytest.raises(RuntimeError, match="piece failed"):
        _cpu_split.run_split([[fails], [slow], [slow]], 0.5)
    assert sorted(finished) == [1, 2]
    pool = _cpu_split._workers(2)
    assert _cpu_split._workers(2) is pool
    monkeypatch.setattr(_cpu_split.os, "getpid", lambda: -1)  # a forked child: its parent's threads are not there
    assert _cpu_split._workers(2) is not pool


def test_a_store_that_dealt_its_cpu_update_still_pickles_and_the_copy_deals_its_own():
    import pickle
    from copy import deepcopy

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = torch.nn.Sequential(*(torch.nn.Linear(300, 300) for _ in range(3)))  # 90K-element weights: big
        state = PolyakEMA.from_module(model)
        state.update(Update(0.9))
        assert any(len(share) for share in state.store._cpu_shares())
        copy = pickle.loads(pickle.dumps(state))  # a closure among the dealt pieces would refuse to pickle
        assert copy.store._shares == []  # dealt again over its own tensors where it is used, never the original's
        twin = deepcopy(state)
        with torch.no_grad():
            for tensor in twin.tracked:
                tensor.add_(1.0)
        reference = [average.clone() for average in twin.averages]
        twin.update(Update(0.5))
        reference_update(reference, twin.tracked, 0.5)
        assert all(torch.equal(a, r) for a, r in zip(twin.averages, reference))
        assert not any(torch.equal(a, b) for a, b in zip(state.averages, twin.averages) if a.is_floating_point())
    finally:
        torch.set_num_threads(before)
