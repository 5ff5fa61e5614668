"""Train a MONAI UNet with DyCON on the demo set: 4 labelled + 36 unlabelled 48^3 volumes.

    python examples/monai_unet_dycon.py [iterations]      # needs monai; CPU minutes

Mean Teacher + UnCL on all voxels + FeCL on a projection head hooked to the UNet's bottom
block (dycon.monai_losses); prints the test Dice of the student at the end.
"""
import copy
import sys

import h5py
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet

from dycon.config import DEFAULTS
from dycon.demo import ensure_demo_data
from dycon.frameworks.mean_teacher import ema_update
from dycon.losses import anchor_weights, patch_labels_dycon
from dycon.monai_losses import FeCLLoss, UnCLLoss, attach_projection_head

root, patch, iterations = ensure_demo_data(), 32, int(sys.argv[1]) if len(sys.argv) > 1 else 400
load = lambda case: [torch.from_numpy(h5py.File(root / "data" / f"{case}.h5")[k][()].T.copy()) for k in ("image", "label")]
train = [load(c) for c in (root / "train.txt").read_text().split()]
labelled, unlabelled = train[:4], train[4:]          # the demo's 10 % labelled split


def crops(volumes, n):
    """n random patch^3 crops: images (n, 1, ...) and labels (n, ...)."""
    picks = [volumes[i] for i in torch.randint(len(volumes), (n,))]
    starts = torch.randint(0, 48 - patch + 1, (n, 3))
    cut = lambda v, s: v[s[0]:s[0] + patch, s[1]:s[1] + patch, s[2]:s[2] + patch]
    return (torch.stack([cut(img, s) for (img, _), s in zip(picks, starts)])[:, None].float(),
            torch.stack([cut(lab, s) for (_, lab), s in zip(picks, starts)]).long())


def bottom(unet):
    """MONAI's UNet nests SkipConnection(Sequential(down, SkipConnection(...), up)): the innermost block."""
    layer = unet.model
    while isinstance(layer, torch.nn.Sequential) and isinstance(layer[1], SkipConnection):
        layer = layer[1].submodule
    return layer


torch.manual_seed(0)
student = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), dropout=0.1)
teacher = copy.deepcopy(student).requires_grad_(False)   # copied before the hook: its own head below
example = torch.zeros(1, 1, patch, patch, patch)
head = attach_projection_head(student, bottom(student), example_input=example, embed_dim=64)
teacher_head = attach_projection_head(teacher, bottom(teacher), example_input=example, embed_dim=64)
teacher_head.load_state_dict(head.state_dict())
optimizer = torch.optim.SGD([*student.parameters(), *head.parameters()], lr=0.03, momentum=0.9, weight_decay=1e-4)
supervised, uncl, fecl = DiceCELoss(to_onehot_y=True, softmax=True), UnCLLoss(), FeCLLoss(teacher_top_k=32)

for step in range(iterations):
    (x_l, y_l), (x_u, _) = crops(labelled, 2), crops(unlabelled, 2)
    x = torch.cat([x_l, x_u])
    logits = student(x)
    embeddings = head()
    with torch.no_grad():
        t_logits = teacher(x + (0.1 * torch.randn_like(x)).clamp(-0.2, 0.2))
        t_embeddings = teacher_head()
    grid = head.grid(head.feature.shape[2:])
    patch_labels = patch_labels_dycon(torch.cat([y_l, y_l]), t_logits.softmax(1), 2, grid, DEFAULTS["loss"])
    beta = 5.0 * (0.5 / 5.0) ** (step / iterations)      # UnCL's beta: 5 -> 0.5 over the run
    loss = (supervised(logits[:2], y_l[:, None]) + 0.5 * uncl(logits, t_logits, beta=beta)
            + 0.5 * fecl(embeddings, patch_labels, t_embeddings, anchor_weight=anchor_weights(logits, grid)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema_update(teacher, student, 0.99, step)
    ema_update(teacher_head, head, 0.99, step)
    if step % 50 == 0:
        print(f"step {step}: loss {loss.item():.3f}")

student.eval()
dice = []
with torch.no_grad():
    for image, label in (load(c) for c in (root / "test.txt").read_text().split()):
        pred = sliding_window_inference(image[None, None].float(), (patch,) * 3, 4, student).argmax(1)[0]
        dice.append((2 * (pred * label).sum() / (pred.sum() + label.sum()).clamp_min(1)).item())
print(f"test Dice (student, {iterations} iterations): {sum(dice) / len(dice):.3f}")
