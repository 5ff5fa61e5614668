"""nnU-Net v2's ``ignore`` label (dataset.json ``"ignore": K``, the highest value): its voxels are
unannotated, so no loss and no metric sees them, and the network does not predict it as a class."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dycon.data import DataError, class_count, ignore_label, list_cases
from dycon.batches import PatchDataset
from dycon.losses import dice_sums, patch_labels_dycon, supervised_sums

nib = pytest.importorskip("nibabel")

SHAPE = (8, 8, 6)
IGNORE = 2


def folder_with_ignore(root, labels=None):
    """Two cases; label 1 a block, label 2 (ignore) the first two x-slices."""
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(("a", "b")):
        image = np.random.default_rng(n).normal(0, 1, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        label[3:6, 3:6, 2:4] = 1
        label[:2] = IGNORE
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
            "labels": labels or {"background": 0, "lesion": 1, "ignore": IGNORE}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return {"layout": "nifti", "root": str(root)}


def test_ignore_label_is_no_class_and_not_trained(tmp_path):
    cfg = folder_with_ignore(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert ignore_label(meta) == IGNORE and class_count(meta) == 2   # background and lesion
    case = list_cases(cfg, "train")[0]
    volume = case.load(num_classes=2)                                 # the ignore value is no class error
    assert volume.ignore_label == IGNORE and (volume.label == IGNORE).any()
    patch = PatchDataset([case], SHAPE, augment=False, num_classes=2)[(0, 7)]["label"]
    assert patch.dtype == torch.int64
    assert torch.equal(patch == -1, torch.from_numpy(volume.label == IGNORE))   # -1: not trained on
    assert set(patch.unique().tolist()) == {-1, 0, 1}


def test_ignore_label_must_be_the_highest(tmp_path):
    cfg = folder_with_ignore(tmp_path, {"background": 0, "ignore": 1, "lesion": 2})
    with pytest.raises(DataError, match="the 'ignore' label \\(1\\) must be the highest label value"):
        list_cases(cfg, "train")


def test_ignored_voxels_give_no_loss_and_no_gradient():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 6, 5, 4)))
    labels[:, :2] = -1                                      # unannotated
    logits = torch.from_numpy(rng.normal(0, 2, (2, 3, 6, 5, 4)).astype(np.float32)).requires_grad_()
    sums = supervised_sums(logits, labels)
    scored = labels >= 0
    expected_ce = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    assert sums["ce"][0].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert sums["ce"][1].item() == scored.sum().item()
    # Dice sums equal those of the scored voxels alone, gathered into one flat "volume"
    probs = logits.softmax(1).permute(0, 2, 3, 4, 1)[scored]               # (voxels, C)
    alone = dice_sums(probs.T[None, :, :, None, None], labels[scored][None, :, None, None], 3)
    assert torch.allclose(sums["dice"].view(-1, 3), alone, rtol=1e-5)
    (sums["ce"][0] + sums["dice"].sum()).backward()
    assert (logits.grad.permute(0, 2, 3, 4, 1)[~scored] == 0).all()       # not trained on
    assert (logits.grad.permute(0, 2, 3, 4, 1)[scored] != 0).any()


def test_ignored_voxels_vote_for_no_patch_class():
    labels = torch.ones(1, 8, 8, 8, dtype=torch.int64)
    labels[0, :4] = -1                                   # half of every patch of the first row unannotated
    probs = torch.full((1, 2, 8, 8, 8), 0.5)
    cfg = {"patch_purity": 0.6, "teacher_confidence": 0.7}
    patch = patch_labels_dycon(labels, probs, 1, (2, 2, 2), cfg).view(2, 2, 2)
    assert (patch[0] == -1).all() and (patch[1] == 1).all()


def test_ignored_voxels_are_not_scored_in_evaluation(tmp_path):
    from dycon.evaluate import evaluate_cases

    class Everything(torch.nn.Module):   # predicts lesion everywhere
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])], 1) + self.p, None

    cfg = folder_with_ignore(tmp_path)
    case = list_cases(cfg, "train")[0]
    label = case.load().label
    rows, summary = evaluate_cases(Everything(), [case], dict(patch_size=SHAPE, stride_xy=4, stride_z=4,
                                                              num_classes=2, device="cpu", largest_component=False))
    lesion, scored = (label == 1).sum(), (label != IGNORE).sum()
    assert rows[0]["dice"] == pytest.approx(2 * lesion / (lesion + scored))    # ignored voxels are no false positive
    assert summary["metric_per_case"][0]["metrics"]["1"]["FP"] == scored - lesion
