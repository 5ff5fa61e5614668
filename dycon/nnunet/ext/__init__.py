"""The folder nnU-Net searches (nnUNet_extTrainer); a package so that installs ship it."""
