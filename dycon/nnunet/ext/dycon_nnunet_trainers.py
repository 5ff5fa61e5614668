"""What nnU-Net imports from the folder in ``nnUNet_extTrainer``: the trainers, by name.

nnU-Net's find_objects.py imports every module of that folder as a top-level module and takes
the class whose name was asked for; the classes themselves live in dycon.nnunet.trainers.
"""
from dycon.nnunet.trainers import (nnUNetTrainerBudget, nnUNetTrainerDyCON, nnUNetTrainerDyCONOfficial,  # noqa: F401
                                   nnUNetTrainerMeanTeacher)
