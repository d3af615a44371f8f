"""What the callbacks check at construction and at fit start, and how they name it: a batch whose size is
ambiguous or disagrees with the dataloader's `batch_size` (with `batch_size_of` as the way out), a progressive
schedule whose accumulation or epochs do not fit the run, and states, directories, selections, teachers and
names of the wrong type or value."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyModel, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, PostHocEMACallback, ProgressiveBatchCallback


class _MetadataModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch["x"]), batch["y"])

    def train_dataloader(self):
        def collate(samples):  # a 1-element metadata tensor first, as some collates do
            x, y = zip(*samples)
            return {"epoch": torch.tensor([0]), "x": torch.stack(x), "y": torch.stack(y)}

        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, collate_fn=collate)


def test_an_ambiguous_batch_raises_and_names_batch_size_of():
    with pytest.raises(ValueError, match=r"ambiguous.*\['epoch'\]: 1.*batch_size_of"):
        make_trainer([EMAScalingCallback(momentum=0.9)]).fit(_MetadataModel())

    class Measured(EMAScalingCallback):
        def batch_size_of(self, batch):
            return len(batch["x"])

    callback = Measured(momentum=0.9, base_batch_size=4)
    make_trainer([callback]).fit(_MetadataModel())
    assert (callback.kappa, callback.samples_seen) == (1.0, 32)


def test_a_first_batch_that_disagrees_with_the_dataloader_raises():
    class Doubled(TinyModel):
        def train_dataloader(self):  # a collate that stacks two augmented views as samples
            def collate(samples):
                x, y = map(torch.stack, zip(*samples))
                return torch.cat([x, x + 0.1]), torch.cat([y, y])

            return DataLoader(TensorDataset(self.x, self.y), batch_size=4, collate_fn=collate)

    with pytest.raises(ValueError, match=r"first batch measures 8 samples.*`batch_size` is 4.*batch_size_of"):
        make_trainer([EMAScalingCallback(momentum=0.9)]).fit(Doubled())
    # a dataset smaller than one batch is not a mismatch
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback]).fit(TinyModel(n_samples=3, batch_size=4))
    assert callback.samples_seen == 3


def test_progressive_accumulation_values_are_checked_at_fit_start():
    progressive = ProgressiveBatchCallback({0: 4, 2: 6}, mode="accumulation")
    callback = EMAScalingCallback(momentum=0.9)
    with pytest.raises(ValueError, match="batch size 6 of epoch 2 is not a multiple"):
        make_trainer([callback, progressive], max_epochs=3).fit(TinyModel(batch_size=4))
    assert callback.samples_seen == 0  # raised before the first step, not at step 16


def test_progressive_schedule_keys_beyond_max_epochs_warn():
    with pytest.warns(UserWarning, match=r"epochs \[2, 5\] are not reached with `max_epochs`=2"):
        make_trainer([ProgressiveBatchCallback({0: 2, 2: 4, 5: 8})], max_epochs=2).fit(TinyModel(batch_size=2))


def test_callback_states_and_directories_of_the_wrong_type_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"state must be a dict, got str"):
        EMAScalingCallback(momentum=0.9).load_state_dict("x")
    existing = tmp_path / "file"
    existing.write_text("")
    with pytest.raises(ValueError, match=r"`directory`=.*file' is an existing file, not a directory"):
        PostHocEMACallback(directory=existing)
    with pytest.raises(ValueError, match=r"`include` is empty"):
        EMAScalingCallback(include=[])
    with pytest.raises(ValueError, match=r"`teachers` maps 'a' to itself"):
        EMAScalingCallback(teachers={"a": "a"})
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string, got ' '"):
        EMAScalingCallback(name=" ")
