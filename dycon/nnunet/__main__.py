"""``python -m dycon.nnunet``: print the folder to export as nnUNet_extTrainer."""
from dycon.nnunet import trainer_folder

print(trainer_folder())
