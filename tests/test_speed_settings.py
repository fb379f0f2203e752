"""Speed and memory settings of erase leave the result as it was (their speed is measured in
bench/, not here)."""

import torch

from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import read_artifact
from conceptctl.erasure.run import erase, prepare_training
from conceptctl.testing import tiny_erase_config


def test_gradient_checkpointing_trains_the_same_weights(tiny_sd1, tmp_path):
    erase(tiny_erase_config(tiny_sd1), tmp_path / "plain")
    erase(tiny_erase_config(tiny_sd1, gradient_checkpointing=True), tmp_path / "checkpointed")
    plain, checkpointed = read_artifact(tmp_path / "plain"), read_artifact(tmp_path /
                                                                           "checkpointed")
    assert checkpointed.manifest["hyperparameters"]["gradient_checkpointing"] is True
    for name, value in plain.weights.items():
        # Recomputing the same activations on the CPU gives the same numbers.
        torch.testing.assert_close(checkpointed.weights[name], value, rtol=0, atol=1e-7)


def test_frozen_copy_shares_what_does_not_train_and_keeps_the_original(tiny_sd1):
    backbone = open_backbone(str(tiny_sd1), device="cpu")
    before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    training = prepare_training(backbone, tiny_erase_config(tiny_sd1))
    student = dict(backbone.unet.named_parameters())
    frozen = dict(training.frozen.named_parameters())
    assert student.keys() == frozen.keys()
    for name, p in frozen.items():
        assert not p.requires_grad
        if name in training.params:  # its own copy: the student's will move
            assert p.data_ptr() != student[name].data_ptr()
        else:  # shared: no second copy of the UNet in memory
            assert p is student[name]
    with torch.no_grad():
        for p in training.params.values():
            p.add_(1.0)
    for name in training.params:
        assert torch.equal(frozen[name], before[name])
    assert all(p.requires_grad for p in training.params.values())
