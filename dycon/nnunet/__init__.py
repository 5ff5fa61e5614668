"""DyCON inside nnU-Net v2 (``pip install -e ".[nnunet]"``; docs/nnunet.md).

    export nnUNet_extTrainer=$(python -m dycon.nnunet)
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerDyCON

``trainer_folder()`` is the folder to put in ``nnUNet_extTrainer``; the trainers are in
dycon.nnunet.trainers (importing it needs nnunetv2), the unlabelled images' handling in
dycon.nnunet.unlabelled.
"""
from __future__ import annotations

from pathlib import Path

TRAINER_NAMES = ("nnUNetTrainerDyCON", "nnUNetTrainerDyCONOfficial", "nnUNetTrainerMeanTeacher",
                 "nnUNetTrainerBudget")


def trainer_folder() -> str:
    """The folder nnU-Net searches for the trainers through ``nnUNet_extTrainer``."""
    return str(Path(__file__).resolve().parent / "ext")
